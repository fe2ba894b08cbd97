// CUDA convolution kernels.
//
//   * fprop, dgrad and wgrad are tiled implicit GEMMs (CUTLASS vocabulary: per group, a GEMM of M×N×K):
//       fprop  M = N·P·Q  N = K/groups  K = C/groups·R·S   A = im2col(input)      B = weight
//       dgrad  M = N·H·W  N = C/groups  K = K/groups·R·S   A = "col2im"(grad_out) B = weight
//       wgrad  M = K/groups  N = C/groups·R·S  K = N·P·Q   A = grad_output        B = im2col(input)
//     One kernel (implicit_gemm_kernel) serves all three; a Problem type supplies the operand gathers and the
//     output scatter. When the output tiles alone cannot fill the GPU, K is split into slices whose partial tiles
//     go to a workspace and are summed in a fixed order by a second kernel: deterministic, no atomics.
//   * Convolutions with one input channel per group (depthwise, or C == 1) have a GEMM K of only R·S, so they use
//     direct kernels instead.
//   * The bias gradient is a per-channel block reduction.
//
// Semantics, argument checks and errors are those of csrc/checks.h, shared with the CPU and Meta kernels.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "common.cuh"

namespace cnn_ext::gpu {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Geometry as seen by the kernels.
// ---------------------------------------------------------------------------------------------------------------

template <typename index_t>
struct ConvGeometry {
  index_t n, c, h, w;  // input
  index_t k, r, s;     // weight: k output channels, r×s kernel
  index_t p, q;        // output
  index_t cg, kg;      // input and output channels per group
  index_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  // Divisors for decomposing linear indices. An empty dimension gets divisor 1: no index lies in it.
  Divmod<index_t> by_pq, by_p, by_q, by_hw, by_h, by_w, by_rs, by_s, by_k, by_c, by_kg, by_stride_h, by_stride_w;
};

template <typename index_t>
ConvGeometry<index_t> make_geometry(const ConvShape<int64_t>& s) {
  auto by = [](int64_t d) { return Divmod<index_t>(std::max<int64_t>(d, 1)); };
  ConvGeometry<index_t> g;
  g.n = s.n, g.c = s.c, g.h = s.h, g.w = s.w;
  g.k = s.k, g.r = s.r, g.s = s.s;
  g.p = s.p, g.q = s.q;
  g.cg = s.c / s.groups, g.kg = s.k / s.groups;
  g.stride_h = s.stride_h, g.stride_w = s.stride_w, g.pad_h = s.pad_h, g.pad_w = s.pad_w;
  g.dil_h = s.dil_h, g.dil_w = s.dil_w;
  g.by_pq = by(s.p * s.q), g.by_p = by(s.p), g.by_q = by(s.q);
  g.by_hw = by(s.h * s.w), g.by_h = by(s.h), g.by_w = by(s.w);
  g.by_rs = by(s.r * s.s), g.by_s = by(s.s);
  g.by_k = by(s.k), g.by_c = by(s.c), g.by_kg = by(s.k / s.groups);
  g.by_stride_h = by(s.stride_h), g.by_stride_w = by(s.stride_w);
  return g;
}

// Whether 32-bit indices suffice: every tensor the kernels touch, and the hyper-parameters that enter the index
// arithmetic, are small (see fits_int32).
bool conv_fits_int32(const ConvShape<int64_t>& s, int64_t workspace_numel) {
  return fits_int32({s.n * s.c * s.h * s.w, s.k * (s.c / s.groups) * s.r * s.s, s.n * s.k * s.p * s.q,
                     workspace_numel, s.stride_h, s.stride_w, s.pad_h, s.pad_w, (s.r - 1) * s.dil_h + 1,
                     (s.s - 1) * s.dil_w + 1});
}

// input[img][channel][h][w] for the input pixel that output pixel (p, q) reads through kernel tap (r, s); zero in
// the padding.
template <typename scalar_t, typename index_t>
__device__ __forceinline__ acc_type<scalar_t> input_at_tap(const scalar_t* input, const ConvGeometry<index_t>& g,
                                                           index_t img, index_t channel, index_t p, index_t q,
                                                           index_t r, index_t s) {
  const index_t h = p * g.stride_h - g.pad_h + r * g.dil_h;
  const index_t w = q * g.stride_w - g.pad_w + s * g.dil_w;
  if (h < 0 || h >= g.h || w < 0 || w >= g.w) return 0;
  return static_cast<acc_type<scalar_t>>(input[((img * g.c + channel) * g.h + h) * g.w + w]);
}

// The output pixel (p, q) whose kernel tap (r, s) reads input pixel (h, w), if there is one: the inverse of
// input_at_tap, used by the input gradient.
template <typename index_t>
__device__ __forceinline__ bool output_for_tap(const ConvGeometry<index_t>& g, index_t h, index_t w, index_t r,
                                               index_t s, index_t& p, index_t& q) {
  const index_t strided_h = h + g.pad_h - r * g.dil_h;
  const index_t strided_w = w + g.pad_w - s * g.dil_w;
  if (strided_h < 0 || strided_w < 0) return false;
  index_t rem_h, rem_w;
  g.by_stride_h.divmod(strided_h, p, rem_h);
  g.by_stride_w.divmod(strided_w, q, rem_w);
  return rem_h == 0 && rem_w == 0 && p < g.p && q < g.q;
}

// ---------------------------------------------------------------------------------------------------------------
// GEMM problems. Each maps (group, m, n, k) coordinates to tensor elements:
//   load_a(group, m, k), load_b(group, k, n)  operand elements, converted to acc_t (only called in range);
//   store(group, m, n, value)                 writes one output element (every element exactly once).
// kAContiguousK / kBContiguousK say along which dimension an operand is contiguous in memory, so the tile loaders
// can walk that dimension fastest across threads and coalesce.
// ---------------------------------------------------------------------------------------------------------------

template <typename scalar_t, typename index_t_>
struct GemmProblemBase {
  using index_t = index_t_;
  using acc_t = acc_type<scalar_t>;
  ConvGeometry<index_t> geo;
  index_t gemm_m, gemm_n, gemm_k, groups;
};

// Forward: A[m = (img, p, q)][k = (c, r, s)] = input tap, B[k][n] = weight[group·Kg + n][c][r][s].
template <typename scalar_t, typename index_t>
struct FpropProblem : GemmProblemBase<scalar_t, index_t> {
  using acc_t = acc_type<scalar_t>;
  static constexpr bool kAContiguousK = false;  // neighbouring m are neighbouring output pixels
  static constexpr bool kBContiguousK = true;   // a weight row is contiguous over (c, r, s)
  const scalar_t* input;
  const scalar_t* weight;
  const scalar_t* bias;  // nullptr without bias
  scalar_t* output;

  __device__ acc_t load_a(index_t group, index_t m, index_t k) const {
    const auto& g = this->geo;
    index_t img, pq, p, q, c, rs, r, s;
    g.by_pq.divmod(m, img, pq);
    g.by_q.divmod(pq, p, q);
    g.by_rs.divmod(k, c, rs);
    g.by_s.divmod(rs, r, s);
    return input_at_tap(input, g, img, group * g.cg + c, p, q, r, s);
  }
  __device__ acc_t load_b(index_t group, index_t k, index_t n) const {
    return static_cast<acc_t>(weight[(group * this->gemm_n + n) * this->gemm_k + k]);
  }
  __device__ void store(index_t group, index_t m, index_t n, acc_t value) const {
    const auto& g = this->geo;
    const index_t channel = group * g.kg + n;
    index_t img, pq;
    g.by_pq.divmod(m, img, pq);
    if (bias != nullptr) value += static_cast<acc_t>(bias[channel]);
    output[(img * g.k + channel) * g.by_pq.divisor + pq] = static_cast<scalar_t>(value);
  }
};

// Input gradient: A[m = (img, h, w)][k = (kout, r, s)] = grad_output at the pixel whose tap (r, s) reads (h, w)
// (zero if none), B[k][n] = weight[group·Kg + kout][n][r][s].
template <typename scalar_t, typename index_t>
struct DgradProblem : GemmProblemBase<scalar_t, index_t> {
  using acc_t = acc_type<scalar_t>;
  static constexpr bool kAContiguousK = false;  // neighbouring m are neighbouring input (so output) pixels
  static constexpr bool kBContiguousK = true;   // runs of R·S along k are contiguous
  const scalar_t* grad_output;
  const scalar_t* weight;
  scalar_t* grad_input;

  __device__ acc_t load_a(index_t group, index_t m, index_t k) const {
    const auto& g = this->geo;
    index_t img, hw, h, w, kout, rs, r, s, p, q;
    g.by_hw.divmod(m, img, hw);
    g.by_w.divmod(hw, h, w);
    g.by_rs.divmod(k, kout, rs);
    g.by_s.divmod(rs, r, s);
    if (!output_for_tap(g, h, w, r, s, p, q)) return 0;
    return static_cast<acc_t>(grad_output[((img * g.k + group * g.kg + kout) * g.p + p) * g.q + q]);
  }
  __device__ acc_t load_b(index_t group, index_t k, index_t n) const {
    const auto& g = this->geo;
    index_t kout, rs;
    g.by_rs.divmod(k, kout, rs);
    return static_cast<acc_t>(weight[((group * g.kg + kout) * g.cg + n) * g.by_rs.divisor + rs]);
  }
  __device__ void store(index_t group, index_t m, index_t n, acc_t value) const {
    const auto& g = this->geo;
    index_t img, hw;
    g.by_hw.divmod(m, img, hw);
    grad_input[(img * g.c + group * g.cg + n) * g.by_hw.divisor + hw] = static_cast<scalar_t>(value);
  }
};

// Weight gradient: A[m = kout][k = (img, p, q)] = grad_output, B[k][n = (c, r, s)] = input tap.
template <typename scalar_t, typename index_t>
struct WgradProblem : GemmProblemBase<scalar_t, index_t> {
  using acc_t = acc_type<scalar_t>;
  static constexpr bool kAContiguousK = true;  // grad_output is contiguous over (p, q)
  static constexpr bool kBContiguousK = true;  // neighbouring k are neighbouring output pixels
  const scalar_t* grad_output;
  const scalar_t* input;
  scalar_t* grad_weight;

  __device__ acc_t load_a(index_t group, index_t m, index_t k) const {
    const auto& g = this->geo;
    index_t img, pq;
    g.by_pq.divmod(k, img, pq);
    return static_cast<acc_t>(grad_output[(img * g.k + group * g.kg + m) * g.by_pq.divisor + pq]);
  }
  __device__ acc_t load_b(index_t group, index_t k, index_t n) const {
    const auto& g = this->geo;
    index_t img, pq, p, q, c, rs, r, s;
    g.by_pq.divmod(k, img, pq);
    g.by_q.divmod(pq, p, q);
    g.by_rs.divmod(n, c, rs);
    g.by_s.divmod(rs, r, s);
    return input_at_tap(input, g, img, group * g.cg + c, p, q, r, s);
  }
  __device__ void store(index_t group, index_t m, index_t n, acc_t value) const {
    grad_weight[(group * this->gemm_m + m) * this->gemm_n + n] = static_cast<scalar_t>(value);
  }
};

// ---------------------------------------------------------------------------------------------------------------
// The implicit GEMM kernel.
//
// A block computes a BM×BN output tile; each thread a TM×TN sub-tile, strided by the thread grid so that a warp's
// shared-memory reads hit distinct banks (A) or broadcast (B), and so that its stores to the M-contiguous outputs
// of fprop/dgrad coalesce. The K loop stages BK-deep slices of A and B in shared memory, double-buffered: the next
// slice's global loads are issued into registers before the current slice's math, and written to the other buffer
// after it, so one __syncthreads per slice suffices.
// ---------------------------------------------------------------------------------------------------------------

template <int BM_, int BN_, int BK_, int TM_, int TN_>
struct GemmTile {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, TM = TM_, TN = TN_;
  static constexpr int kThreadsM = BM / TM;
  static constexpr int kThreadsN = BN / TN;
  static constexpr int kThreads = kThreadsM * kThreadsN;
  static constexpr int kALoads = BM * BK / kThreads;  // A elements each thread loads per K slice
  static constexpr int kBLoads = BN * BK / kThreads;
  static_assert(BM % TM == 0 && BN % TN == 0, "thread tiles must divide the block tile");
  static_assert(BM * BK % kThreads == 0 && BN * BK % kThreads == 0, "tile loads must split evenly over threads");
  static_assert(kThreads % BM == 0 && kThreads % BN == 0 && kThreads % BK == 0,
                "the tile loaders map threads to whole rows/columns");
};

using DefaultTile = GemmTile<64, 64, 16, 4, 4>;

// The row (M or N coordinate) and k of the e-th element thread `tid` loads in a ROWS×BK operand tile. Threads walk
// the operand's contiguous dimension fastest, so a warp's global loads coalesce.
template <int ROWS, int BK, int THREADS, bool kContiguousK>
__device__ __forceinline__ void tile_load_coord(int tid, int e, int& row, int& k) {
  if constexpr (kContiguousK) {
    k = tid % BK;
    row = tid / BK + e * (THREADS / BK);
  } else {
    row = tid % ROWS;
    k = tid / ROWS + e * (THREADS / ROWS);
  }
}

// Grid: x = M tiles, y = N tiles, z = (K slice, group) pairs, grid-strided because gridDim.z is capped at 65535.
// With one slice the tile is stored through problem.store; with several, the slice's partial tile goes to
// workspace[slice][group][n][m] for split_k_reduce_kernel.
template <typename Tile, typename Problem>
__global__ void __launch_bounds__(Tile::kThreads)
    implicit_gemm_kernel(const Problem problem, const typename Problem::index_t splits,
                         const typename Problem::index_t k_per_split, typename Problem::acc_t* workspace) {
  using index_t = typename Problem::index_t;
  using acc_t = typename Problem::acc_t;
  constexpr int BM = Tile::BM, BN = Tile::BN, BK = Tile::BK, TM = Tile::TM, TN = Tile::TN;
  // K-major tiles: the inner product reads a row of each. The +1 spreads the K-fastest loaders' column writes
  // over banks.
  __shared__ acc_t a_tile[2][BK][BM + 1];
  __shared__ acc_t b_tile[2][BK][BN + 1];

  const int tid = threadIdx.x;
  const int thread_m = tid % Tile::kThreadsM;
  const int thread_n = tid / Tile::kThreadsM;
  const index_t block_m = static_cast<index_t>(blockIdx.x) * BM;
  const index_t block_n = static_cast<index_t>(blockIdx.y) * BN;
  const int64_t num_z = static_cast<int64_t>(problem.groups) * splits;

  for (int64_t z = blockIdx.z; z < num_z; z += gridDim.z) {
    const index_t group = static_cast<index_t>(z % problem.groups);
    const index_t split = static_cast<index_t>(z / problem.groups);
    const index_t k_begin = split * k_per_split;
    const index_t k_end = minimum(problem.gemm_k, k_begin + k_per_split);
    const index_t k_slices = k_end > k_begin ? ceil_div<index_t>(k_end - k_begin, BK) : 0;

    acc_t a_staged[Tile::kALoads];
    acc_t b_staged[Tile::kBLoads];
    // Global -> registers: the K slice starting at k0, zero outside the problem.
    auto fetch = [&](index_t k0) {
#pragma unroll
      for (int e = 0; e < Tile::kALoads; ++e) {
        int row, kk;
        tile_load_coord<BM, BK, Tile::kThreads, Problem::kAContiguousK>(tid, e, row, kk);
        const index_t m = block_m + row, k = k0 + kk;
        a_staged[e] = (m < problem.gemm_m && k < k_end) ? problem.load_a(group, m, k) : acc_t(0);
      }
#pragma unroll
      for (int e = 0; e < Tile::kBLoads; ++e) {
        int row, kk;
        tile_load_coord<BN, BK, Tile::kThreads, Problem::kBContiguousK>(tid, e, row, kk);
        const index_t n = block_n + row, k = k0 + kk;
        b_staged[e] = (n < problem.gemm_n && k < k_end) ? problem.load_b(group, k, n) : acc_t(0);
      }
    };
    // Registers -> shared buffer.
    auto stash = [&](int buffer) {
#pragma unroll
      for (int e = 0; e < Tile::kALoads; ++e) {
        int row, kk;
        tile_load_coord<BM, BK, Tile::kThreads, Problem::kAContiguousK>(tid, e, row, kk);
        a_tile[buffer][kk][row] = a_staged[e];
      }
#pragma unroll
      for (int e = 0; e < Tile::kBLoads; ++e) {
        int row, kk;
        tile_load_coord<BN, BK, Tile::kThreads, Problem::kBContiguousK>(tid, e, row, kk);
        b_tile[buffer][kk][row] = b_staged[e];
      }
    };

    acc_t acc[TM][TN] = {};
    if (k_slices > 0) {
      fetch(k_begin);
      stash(0);
      __syncthreads();
    }
    for (index_t slice = 0; slice < k_slices; ++slice) {
      const int buffer = static_cast<int>(slice & 1);
      const bool has_next = slice + 1 < k_slices;
      if (has_next) fetch(k_begin + (slice + 1) * BK);
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        acc_t a[TM], b[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) a[i] = a_tile[buffer][kk][thread_m + i * Tile::kThreadsM];
#pragma unroll
        for (int j = 0; j < TN; ++j) b[j] = b_tile[buffer][kk][thread_n + j * Tile::kThreadsN];
#pragma unroll
        for (int i = 0; i < TM; ++i) {
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
        }
      }
      // Writing the other buffer is safe: its last readers finished before the previous iteration's barrier.
      // This barrier publishes it to the next iteration and retires this iteration's reads of `buffer`, which
      // the next iteration overwrites.
      if (has_next) stash(buffer ^ 1);
      __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < TM; ++i) {
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const index_t m = block_m + thread_m + i * Tile::kThreadsM;
        const index_t n = block_n + thread_n + j * Tile::kThreadsN;
        if (m >= problem.gemm_m || n >= problem.gemm_n) continue;
        if (splits == 1) {
          problem.store(group, m, n, acc[i][j]);
        } else {
          workspace[((split * problem.groups + group) * problem.gemm_n + n) * problem.gemm_m + m] = acc[i][j];
        }
      }
    }
  }
}

// Sums the K slices' partial tiles in slice order (so the result is deterministic) and stores the output.
template <typename Problem>
__global__ void split_k_reduce_kernel(const Problem problem, const typename Problem::index_t splits,
                                      const typename Problem::acc_t* workspace) {
  using index_t = typename Problem::index_t;
  using acc_t = typename Problem::acc_t;
  const index_t slice_numel = problem.groups * problem.gemm_n * problem.gemm_m;
  for (index_t idx = global_thread_index<index_t>(); idx < slice_numel; idx += grid_stride<index_t>()) {
    acc_t sum = 0;
    for (index_t split = 0; split < splits; ++split) sum += workspace[split * slice_numel + idx];
    const index_t m = idx % problem.gemm_m;
    const index_t group_n = idx / problem.gemm_m;
    problem.store(group_n / problem.gemm_n, m, group_n % problem.gemm_n, sum);
  }
}

// How a GEMM is laid over the grid.
struct GemmPlan {
  int64_t gemm_m, gemm_n, gemm_k, groups;
  int64_t tiles_m, tiles_n;
  int64_t splits, k_per_split;  // K slices, each a multiple of BK deep (the last may be shorter)

  int64_t workspace_numel() const { return splits > 1 ? splits * groups * gemm_n * gemm_m : 0; }
};

// Enough blocks to keep every SM busy with two; a K slice is at least kMinKPerSplit deep so the partial tiles'
// round trip through memory stays small next to the slice's math.
constexpr int64_t kTargetBlocksPerSm = 2;
constexpr int64_t kMinKPerSplit = 256;
constexpr int64_t kMaxSplits = 64;
constexpr int64_t kMaxGridYZ = 65535;

template <typename Tile>
GemmPlan plan_gemm(int64_t gemm_m, int64_t gemm_n, int64_t gemm_k, int64_t groups) {
  GemmPlan plan{gemm_m, gemm_n, gemm_k, groups, ceil_div<int64_t>(gemm_m, Tile::BM),
                ceil_div<int64_t>(gemm_n, Tile::BN), 1, gemm_k};
  TORCH_CHECK(plan.tiles_m <= std::numeric_limits<int32_t>::max() && plan.tiles_n <= kMaxGridYZ,
              "cnn_ext: convolution GEMM of ", gemm_m, "x", gemm_n, " is too large for the CUDA grid");
  const int64_t tiles = plan.tiles_m * plan.tiles_n * groups;
  const int64_t target_blocks = kTargetBlocksPerSm * multiprocessor_count();
  if (tiles < target_blocks && gemm_k > kMinKPerSplit) {
    const int64_t splits = std::min({ceil_div(target_blocks, tiles), ceil_div(gemm_k, kMinKPerSplit), kMaxSplits});
    plan.k_per_split = ceil_div<int64_t>(ceil_div(gemm_k, splits), Tile::BK) * Tile::BK;
    plan.splits = ceil_div(gemm_k, plan.k_per_split);  // rounding k_per_split up may leave fewer slices
  }
  return plan;
}

template <typename Tile, typename Problem>
void run_implicit_gemm(const Problem& problem, const GemmPlan& plan, const at::TensorOptions& options) {
  using acc_t = typename Problem::acc_t;
  using index_t = typename Problem::index_t;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor workspace;
  acc_t* workspace_ptr = nullptr;
  if (plan.splits > 1) {
    workspace = at::empty({plan.workspace_numel()}, options.dtype(c10::CppTypeToScalarType<acc_t>::value));
    workspace_ptr = workspace.mutable_data_ptr<acc_t>();
  }
  const dim3 grid(static_cast<unsigned>(plan.tiles_m), static_cast<unsigned>(plan.tiles_n),
                  static_cast<unsigned>(std::min(plan.groups * plan.splits, kMaxGridYZ)));
  implicit_gemm_kernel<Tile, Problem><<<grid, Tile::kThreads, 0, stream>>>(
      problem, static_cast<index_t>(plan.splits), static_cast<index_t>(plan.k_per_split), workspace_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (plan.splits > 1) {
    split_k_reduce_kernel<Problem>
        <<<elementwise_blocks(plan.groups * plan.gemm_n * plan.gemm_m), kElementwiseThreads, 0, stream>>>(
            problem, static_cast<index_t>(plan.splits), workspace_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename Problem>
void set_gemm_dims(Problem& problem, const ConvShape<int64_t>& s, const GemmPlan& plan) {
  using index_t = typename Problem::index_t;
  problem.geo = make_geometry<index_t>(s);
  problem.gemm_m = static_cast<index_t>(plan.gemm_m);
  problem.gemm_n = static_cast<index_t>(plan.gemm_n);
  problem.gemm_k = static_cast<index_t>(plan.gemm_k);
  problem.groups = static_cast<index_t>(plan.groups);
}

// ---------------------------------------------------------------------------------------------------------------
// Direct kernels for one input channel per group (input channel = group = output channel / Kg).
// ---------------------------------------------------------------------------------------------------------------

template <typename scalar_t, typename index_t>
__global__ void direct_fprop_kernel(const scalar_t* input, const scalar_t* weight, const scalar_t* bias,
                                    scalar_t* output, const ConvGeometry<index_t> g, const index_t total) {
  using acc_t = acc_type<scalar_t>;
  for (index_t idx = global_thread_index<index_t>(); idx < total; idx += grid_stride<index_t>()) {
    index_t rest, img_k, img, k, p, q;
    g.by_q.divmod(idx, rest, q);
    g.by_p.divmod(rest, img_k, p);
    g.by_k.divmod(img_k, img, k);
    const index_t channel = g.by_kg.div(k);
    acc_t sum = 0;
    for (index_t r = 0; r < g.r; ++r) {
      for (index_t s = 0; s < g.s; ++s) {
        sum += input_at_tap(input, g, img, channel, p, q, r, s) * static_cast<acc_t>(weight[(k * g.r + r) * g.s + s]);
      }
    }
    if (bias != nullptr) sum += static_cast<acc_t>(bias[k]);
    output[idx] = static_cast<scalar_t>(sum);
  }
}

template <typename scalar_t, typename index_t>
__global__ void direct_dgrad_kernel(const scalar_t* grad_output, const scalar_t* weight, scalar_t* grad_input,
                                    const ConvGeometry<index_t> g, const index_t total) {
  using acc_t = acc_type<scalar_t>;
  for (index_t idx = global_thread_index<index_t>(); idx < total; idx += grid_stride<index_t>()) {
    index_t rest, img_c, img, c, h, w;
    g.by_w.divmod(idx, rest, w);
    g.by_h.divmod(rest, img_c, h);
    g.by_c.divmod(img_c, img, c);
    acc_t sum = 0;
    for (index_t r = 0; r < g.r; ++r) {
      for (index_t s = 0; s < g.s; ++s) {
        index_t p, q;
        if (!output_for_tap(g, h, w, r, s, p, q)) continue;
        for (index_t k = c * g.kg; k < (c + 1) * g.kg; ++k) {
          sum += static_cast<acc_t>(grad_output[((img * g.k + k) * g.p + p) * g.q + q]) *
                 static_cast<acc_t>(weight[(k * g.r + r) * g.s + s]);
        }
      }
    }
    grad_input[idx] = static_cast<scalar_t>(sum);
  }
}

constexpr int kReduceThreads = 256;

// One block per weight element (grid-strided): a fixed-order reduction over N·P·Q, so no atomics are needed.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kReduceThreads)
    direct_wgrad_kernel(const scalar_t* grad_output, const scalar_t* input, scalar_t* grad_weight,
                        const ConvGeometry<index_t> g, const index_t weight_numel) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t scratch[kReduceThreads];
  const index_t reduce_size = g.n * g.by_pq.divisor;
  for (index_t widx = blockIdx.x; widx < weight_numel; widx += static_cast<index_t>(gridDim.x)) {
    index_t k, rs, r, s;
    g.by_rs.divmod(widx, k, rs);
    g.by_s.divmod(rs, r, s);
    const index_t channel = g.by_kg.div(k);
    acc_t partial = 0;
    for (index_t i = threadIdx.x; i < reduce_size; i += kReduceThreads) {
      index_t img, pq, p, q;
      g.by_pq.divmod(i, img, pq);
      g.by_q.divmod(pq, p, q);
      partial += static_cast<acc_t>(grad_output[(img * g.k + k) * g.by_pq.divisor + pq]) *
                 input_at_tap(input, g, img, channel, p, q, r, s);
    }
    const acc_t sum = block_sum<kReduceThreads>(partial, scratch);
    if (threadIdx.x == 0) grad_weight[widx] = static_cast<scalar_t>(sum);
  }
}

// grad_bias[k] = sum over (img, p, q) of grad_output[img][k][p][q]: one block per channel (grid-strided).
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kReduceThreads)
    bias_grad_kernel(const scalar_t* grad_output, scalar_t* grad_bias, const index_t channels,
                     const index_t reduce_size, const Divmod<index_t> by_plane) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t scratch[kReduceThreads];
  for (index_t k = blockIdx.x; k < channels; k += static_cast<index_t>(gridDim.x)) {
    acc_t partial = 0;
    for (index_t i = threadIdx.x; i < reduce_size; i += kReduceThreads) {
      index_t img, pq;
      by_plane.divmod(i, img, pq);
      partial += static_cast<acc_t>(grad_output[(img * channels + k) * by_plane.divisor + pq]);
    }
    const acc_t sum = block_sum<kReduceThreads>(partial, scratch);
    if (threadIdx.x == 0) grad_bias[k] = static_cast<scalar_t>(sum);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------------------------

bool one_input_channel_per_group(const ConvShape<int64_t>& s) { return s.c == s.groups; }

template <typename scalar_t>
void conv2d_forward(const ConvShape<int64_t>& s, const at::Tensor& input, const at::Tensor& weight,
                    const scalar_t* bias, at::Tensor& output) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (one_input_channel_per_group(s)) {
    dispatch_index_type(conv_fits_int32(s, 0), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      const int64_t total = output.numel();
      direct_fprop_kernel<scalar_t, index_t><<<elementwise_blocks(total), kElementwiseThreads, 0, stream>>>(
          input.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), bias,
          output.mutable_data_ptr<scalar_t>(), make_geometry<index_t>(s), static_cast<index_t>(total));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  const auto plan = plan_gemm<DefaultTile>(s.n * s.p * s.q, s.k / s.groups, s.c / s.groups * s.r * s.s, s.groups);
  dispatch_index_type(conv_fits_int32(s, plan.workspace_numel()), [&](auto index_tag) {
    FpropProblem<scalar_t, decltype(index_tag)> problem;
    set_gemm_dims(problem, s, plan);
    problem.input = input.const_data_ptr<scalar_t>();
    problem.weight = weight.const_data_ptr<scalar_t>();
    problem.bias = bias;
    problem.output = output.mutable_data_ptr<scalar_t>();
    run_implicit_gemm<DefaultTile>(problem, plan, input.options());
  });
}

template <typename scalar_t>
void conv2d_input_grad(const ConvShape<int64_t>& s, const at::Tensor& grad_output, const at::Tensor& weight,
                       at::Tensor& grad_input) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (one_input_channel_per_group(s)) {
    dispatch_index_type(conv_fits_int32(s, 0), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      const int64_t total = grad_input.numel();
      direct_dgrad_kernel<scalar_t, index_t><<<elementwise_blocks(total), kElementwiseThreads, 0, stream>>>(
          grad_output.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
          grad_input.mutable_data_ptr<scalar_t>(), make_geometry<index_t>(s), static_cast<index_t>(total));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  const auto plan = plan_gemm<DefaultTile>(s.n * s.h * s.w, s.c / s.groups, s.k / s.groups * s.r * s.s, s.groups);
  dispatch_index_type(conv_fits_int32(s, plan.workspace_numel()), [&](auto index_tag) {
    DgradProblem<scalar_t, decltype(index_tag)> problem;
    set_gemm_dims(problem, s, plan);
    problem.grad_output = grad_output.const_data_ptr<scalar_t>();
    problem.weight = weight.const_data_ptr<scalar_t>();
    problem.grad_input = grad_input.mutable_data_ptr<scalar_t>();
    run_implicit_gemm<DefaultTile>(problem, plan, grad_output.options());
  });
}

template <typename scalar_t>
void conv2d_weight_grad(const ConvShape<int64_t>& s, const at::Tensor& grad_output, const at::Tensor& input,
                        at::Tensor& grad_weight) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (one_input_channel_per_group(s)) {
    dispatch_index_type(conv_fits_int32(s, 0), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      const int64_t weight_numel = grad_weight.numel();
      const auto blocks = static_cast<unsigned>(std::min(weight_numel, kMaxElementwiseBlocks));
      direct_wgrad_kernel<scalar_t, index_t><<<blocks, kReduceThreads, 0, stream>>>(
          grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
          grad_weight.mutable_data_ptr<scalar_t>(), make_geometry<index_t>(s), static_cast<index_t>(weight_numel));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  const auto plan = plan_gemm<DefaultTile>(s.k / s.groups, s.c / s.groups * s.r * s.s, s.n * s.p * s.q, s.groups);
  dispatch_index_type(conv_fits_int32(s, plan.workspace_numel()), [&](auto index_tag) {
    WgradProblem<scalar_t, decltype(index_tag)> problem;
    set_gemm_dims(problem, s, plan);
    problem.grad_output = grad_output.const_data_ptr<scalar_t>();
    problem.input = input.const_data_ptr<scalar_t>();
    problem.grad_weight = grad_weight.mutable_data_ptr<scalar_t>();
    run_implicit_gemm<DefaultTile>(problem, plan, grad_output.options());
  });
}

at::Tensor conv2d_cuda(const at::Tensor& input_arg, const at::Tensor& weight_arg,
                       const c10::optional<at::Tensor>& bias_arg, c10::IntArrayRef stride, c10::IntArrayRef padding,
                       c10::IntArrayRef dilation, int64_t groups) {
  const char* op = "cnn_ext.conv2d";
  const auto shape = check_conv2d<int64_t>(op, input_arg, weight_arg, bias_arg, stride, padding, dilation, groups);
  check_cuda_dtype(op, input_arg, "input");
  const c10::cuda::CUDAGuard device_guard(input_arg.device());
  const at::Tensor input = input_arg.contiguous();
  const at::Tensor weight = weight_arg.contiguous();
  const at::Tensor bias = bias_arg.has_value() ? bias_arg->contiguous() : at::Tensor();
  at::Tensor output = at::empty(shape.output_sizes(), input.options());
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cnn_ext_conv2d_cuda", [&] {
    conv2d_forward<scalar_t>(shape, input, weight, bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                             output);
  });
  return output;
}

at::Tensor conv2d_backward_input_cuda(const at::Tensor& grad_output_arg, const at::Tensor& weight_arg,
                                      c10::IntArrayRef input_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                      c10::IntArrayRef dilation, int64_t groups) {
  const char* op = "cnn_ext.conv2d_backward_input";
  const auto shape = check_conv2d_backward_input<int64_t>(op, grad_output_arg, weight_arg, input_size, stride,
                                                          padding, dilation, groups);
  check_cuda_dtype(op, grad_output_arg, "grad_output");
  const c10::cuda::CUDAGuard device_guard(grad_output_arg.device());
  const at::Tensor grad_output = grad_output_arg.contiguous();
  const at::Tensor weight = weight_arg.contiguous();
  at::Tensor grad_input = at::empty(shape.input_sizes(), grad_output.options());
  if (grad_input.numel() == 0) return grad_input;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                  "cnn_ext_conv2d_backward_input_cuda",
                                  [&] { conv2d_input_grad<scalar_t>(shape, grad_output, weight, grad_input); });
  return grad_input;
}

at::Tensor conv2d_backward_weight_cuda(const at::Tensor& grad_output_arg, const at::Tensor& input_arg,
                                       c10::IntArrayRef weight_size, c10::IntArrayRef stride,
                                       c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  const char* op = "cnn_ext.conv2d_backward_weight";
  const auto shape = check_conv2d_backward_weight<int64_t>(op, grad_output_arg, input_arg, weight_size, stride,
                                                           padding, dilation, groups);
  check_cuda_dtype(op, grad_output_arg, "grad_output");
  const c10::cuda::CUDAGuard device_guard(grad_output_arg.device());
  const at::Tensor grad_output = grad_output_arg.contiguous();
  const at::Tensor input = input_arg.contiguous();
  at::Tensor grad_weight = at::empty(shape.weight_sizes(), grad_output.options());
  if (grad_weight.numel() == 0) return grad_weight;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                  "cnn_ext_conv2d_backward_weight_cuda",
                                  [&] { conv2d_weight_grad<scalar_t>(shape, grad_output, input, grad_weight); });
  return grad_weight;
}

at::Tensor conv2d_backward_bias_cuda(const at::Tensor& grad_output_arg) {
  const char* op = "cnn_ext.conv2d_backward_bias";
  check_conv2d_backward_bias(op, grad_output_arg);
  check_cuda_dtype(op, grad_output_arg, "grad_output");
  const c10::cuda::CUDAGuard device_guard(grad_output_arg.device());
  const at::Tensor grad_output = grad_output_arg.contiguous();
  const int64_t batch = grad_output.size(0), channels = grad_output.size(1);
  const int64_t plane = grad_output.size(2) * grad_output.size(3);
  at::Tensor grad_bias = at::empty({channels}, grad_output.options());
  if (channels == 0) return grad_bias;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                  "cnn_ext_conv2d_backward_bias_cuda", [&] {
    dispatch_index_type(fits_int32({grad_output.numel()}), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      const auto blocks = static_cast<unsigned>(std::min(channels, kMaxElementwiseBlocks));
      // With nothing to reduce (batch or plane empty) the kernel writes zeros; the divisor is then unused.
      bias_grad_kernel<scalar_t, index_t><<<blocks, kReduceThreads, 0, stream>>>(
          grad_output.const_data_ptr<scalar_t>(), grad_bias.mutable_data_ptr<scalar_t>(),
          static_cast<index_t>(channels), static_cast<index_t>(batch * plane),
          Divmod<index_t>(std::max<int64_t>(plane, 1)));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_bias;
}

}  // namespace

TORCH_LIBRARY_IMPL(cnn_ext, CUDA, m) {
  m.impl("conv2d", &conv2d_cuda);
  m.impl("conv2d_backward_input", &conv2d_backward_input_cuda);
  m.impl("conv2d_backward_weight", &conv2d_backward_weight_cuda);
  m.impl("conv2d_backward_bias", &conv2d_backward_bias_cuda);
}

}  // namespace cnn_ext::gpu
