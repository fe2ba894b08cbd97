// CUDA convolution kernels (device code; the launch configuration and the operators are in conv2d.cu).
//
//   * fprop, dgrad and wgrad are tiled implicit GEMMs (CUTLASS vocabulary: per group, a GEMM of M×N×K):
//       fprop  M = N·P·Q  N = K/groups  K = C/groups·R·S   A = im2col(input)      B = weight
//       dgrad  M = N·H·W  N = C/groups  K = K/groups·R·S   A = "col2im"(grad_out) B = weight
//       wgrad  M = K/groups  N = C/groups·R·S  K = N·P·Q   A = grad_output        B = im2col(input)
//     One kernel (implicit_gemm_kernel) serves all three; a Problem type supplies the operand gathers and the
//     output scatter. When the output tiles alone cannot fill the GPU, K is split into slices whose partial tiles
//     go to a workspace and are summed in a fixed order by a second kernel: deterministic, no atomics.
//   * Convolutions with one input channel per group (depthwise, or C == 1) have a GEMM K of only R·S, so they use
//     direct kernels instead; so does the input gradient wherever a group has few input channels (its GEMM N).
//   * The bias gradient is a per-channel block reduction.
//
// Included by conv2d.cu only (compiled by nvcc for a GPU, or by the host compiler for the CUDA emulator).
#pragma once

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

// 64×64 with 4×4 per thread: two operand loads from shared memory per FMA, which caps the kernel near a quarter of
// the fp32 peak (17 TFLOP/s measured on an H200's ResNet layers), but small GEMMs still fill the GPU. The larger
// tiles halve (128×128, 8×8 per thread) or cut by a third (128×64, 8×4) the shared-memory traffic per FMA, for
// GEMMs with enough tiles; CNN_EXT_CUDA_TILE selects them (common.cuh) until a GPU has measured where each pays.
using DefaultTile = GemmTile<64, 64, 16, 4, 4>;
using WideTile = GemmTile<128, 64, 16, 8, 4>;
using LargeTile = GemmTile<128, 128, 8, 8, 8>;

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

// ---------------------------------------------------------------------------------------------------------------
// Direct kernels: fprop and wgrad for one input channel per group (input channel = group = output channel / Kg),
// dgrad for few input channels per group.
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

// One axis of the direct input gradient, for input position `in`: the taps to try (first, first + step, ...) and the
// output position each reads `in` through. With dilation 1 only every stride-th tap from (in + pad) mod stride can
// land on a whole output position, so a stride-2 layer's threads do not idle through the others; with a dilation
// every tap is tried. Ascending taps give descending output positions: once below 0, no later tap reaches one.
template <typename index_t>
struct DgradAxis {
  enum class Tap { kHit, kSkip, kStop };
  index_t padded_in, dilation, size, first, step;
  const Divmod<index_t>& by_stride;

  __device__ DgradAxis(index_t in, index_t pad, index_t dil, const Divmod<index_t>& by_stride_, index_t out_size)
      : padded_in(in + pad), dilation(dil), size(out_size), first(0), step(1), by_stride(by_stride_) {
    if (dil == 1) {
      index_t quotient;
      by_stride.divmod(padded_in, quotient, first);
      step = by_stride.divisor;
    }
  }

  // kHit with the output position in `out`, kSkip where the tap falls between output positions or past the last,
  // kStop where it falls below the first.
  __device__ Tap output(index_t tap, index_t& out) const {
    const index_t strided = padded_in - tap * dilation;
    if (strided < 0) return Tap::kStop;
    index_t rem;
    by_stride.divmod(strided, out, rem);
    return rem == 0 && out < size ? Tap::kHit : Tap::kSkip;
  }
};

// The input gradient, one thread per input element: a sum over its group's output channels and the kernel taps
// that read it. Used where a group has few input channels (the GEMM's N, C/groups, would leave most of a tile
// idle: the 7×7 stem's 3, MNIST's 1 and 10).
template <typename scalar_t, typename index_t>
__global__ void direct_dgrad_kernel(const scalar_t* grad_output, const scalar_t* weight, scalar_t* grad_input,
                                    const ConvGeometry<index_t> g, const index_t total) {
  using acc_t = acc_type<scalar_t>;
  using Tap = typename DgradAxis<index_t>::Tap;
  for (index_t idx = global_thread_index<index_t>(); idx < total; idx += grid_stride<index_t>()) {
    index_t rest, img_c, img, c, h, w;
    g.by_w.divmod(idx, rest, w);
    g.by_h.divmod(rest, img_c, h);
    g.by_c.divmod(img_c, img, c);
    const index_t group = c / g.cg, channel_in_group = c - group * g.cg;
    const DgradAxis<index_t> rows(h, g.pad_h, g.dil_h, g.by_stride_h, g.p);
    const DgradAxis<index_t> cols(w, g.pad_w, g.dil_w, g.by_stride_w, g.q);
    acc_t sum = 0;
    for (index_t r = rows.first; r < g.r; r += rows.step) {
      index_t p;
      const Tap row_tap = rows.output(r, p);
      if (row_tap == Tap::kStop) break;
      if (row_tap == Tap::kSkip) continue;
      for (index_t s = cols.first; s < g.s; s += cols.step) {
        index_t q;
        const Tap col_tap = cols.output(s, q);
        if (col_tap == Tap::kStop) break;
        if (col_tap == Tap::kSkip) continue;
        for (index_t k = group * g.kg; k < (group + 1) * g.kg; ++k) {
          sum += static_cast<acc_t>(grad_output[((img * g.k + k) * g.p + p) * g.q + q]) *
                 static_cast<acc_t>(weight[((k * g.cg + channel_in_group) * g.r + r) * g.s + s]);
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

}  // namespace
}  // namespace cnn_ext::gpu
