// Helpers shared by the CUDA kernels: index-width selection, fast integer division, launch sizing and a
// deterministic block reduction.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>

#include "../checks.h"
#include "runtime.cuh"

namespace cnn_ext::gpu {

inline void check_cuda_dtype(const char* op, const at::Tensor& t, const char* name) {
  check_backend_dtype(op, t, name, {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}, "CUDA");
}

// float16/bfloat16 accumulate in float32; float32 and float64 in their own type.
template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

constexpr int kElementwiseThreads = 256;
// Elementwise kernels use grid-stride loops; capping the grid keeps (index + stride) far below 2^31.
constexpr int64_t kMaxElementwiseBlocks = int64_t(1) << 20;

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// min/max for any index type (CUDA's overloads do not cover every integer type on every platform).
template <typename T>
__host__ __device__ __forceinline__ T minimum(T a, T b) {
  return b < a ? b : a;
}

// The taps of a max-pool window along one axis (the CUDA twin of cpu/window_axis.h): output position o reads input
// positions first, first + dilation, ... below end, where first skips the leading padding and end is clipped to the
// input; first >= end when every tap is in the padding. Shared by max_pool2d and the fused conv + max-pool kernels.
template <typename index_t>
struct WindowTaps {
  index_t first, end;
};

template <typename index_t>
__device__ __forceinline__ WindowTaps<index_t> window_taps(index_t o, index_t stride, index_t pad, index_t kernel,
                                                           index_t dilation, index_t size) {
  const index_t start = o * stride - pad;
  const index_t first = start >= 0 ? start : start + ceil_div<index_t>(-start, dilation) * dilation;
  return {first, minimum(start + (kernel - 1) * dilation + 1, size)};
}

template <typename T>
__host__ __device__ __forceinline__ T maximum(T a, T b) {
  return a < b ? b : a;
}

// -inf in acc_t (float or double): where a max-pool window's maximum starts.
template <typename acc_t>
__host__ __device__ __forceinline__ acc_t negative_infinity() {
  return static_cast<acc_t>(-INFINITY);
}

// ---------------------------------------------------------------------------------------------------------------
// Index width. Kernels are templated on index_t; 32-bit arithmetic (and fast division) is used only when every
// tensor and every hyper-parameter extent is below 2^29, so that sums of a few such values, tile overhang and
// grid-stride steps cannot overflow int32. force_int64_indices() (runtime.cuh) makes every launch take the 64-bit
// path, so that tests can run it on small shapes.
// ---------------------------------------------------------------------------------------------------------------

constexpr int64_t kMaxInt32Extent = std::numeric_limits<int32_t>::max() / 4;

inline bool fits_int32(std::initializer_list<int64_t> extents) {
  return !force_int64_indices() &&
         std::all_of(extents.begin(), extents.end(), [](int64_t e) { return e <= kMaxInt32Extent; });
}

// Calls f(int32_t{}) or f(int64_t{}); the callee recovers the type with decltype.
template <typename F>
void dispatch_index_type(bool use_int32, F&& f) {
  if (use_int32) {
    f(int32_t{});
  } else {
    f(int64_t{});
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The implicit GEMM's block tile. CNN_EXT_CUDA_TILE=64x64 (the default), 128x64 or 128x128 chooses it for every
// float32/float16/bfloat16 GEMM with 32-bit indices (float64 and 64-bit-index GEMMs keep 64x64). Read at every
// launch, so that tests and benchmarks can switch it within a process.
// ---------------------------------------------------------------------------------------------------------------

enum class GemmTileChoice { k64x64, k128x64, k128x128 };

inline GemmTileChoice gemm_tile_choice() {
  const char* value = std::getenv("CNN_EXT_CUDA_TILE");
  if (value == nullptr || value[0] == '\0' || std::strcmp(value, "64x64") == 0) return GemmTileChoice::k64x64;
  if (std::strcmp(value, "128x64") == 0) return GemmTileChoice::k128x64;
  TORCH_CHECK_VALUE(std::strcmp(value, "128x128") == 0, "CNN_EXT_CUDA_TILE must be 64x64, 128x64 or 128x128, got '",
                    value, "'");
  return GemmTileChoice::k128x128;
}

// ---------------------------------------------------------------------------------------------------------------
// Division by a divisor fixed at launch time. Decomposing linear indices (m -> n, p, q) is most of the integer
// work in the kernels; for 32-bit indices a multiply-high and shift replaces the ~20-instruction divide
// (Granlund & Montgomery round-up method, as in CUTLASS's FastDivmod: exact for dividends in [0, 2^31)).
// Only non-negative dividends may be passed.
// ---------------------------------------------------------------------------------------------------------------

template <typename index_t>
struct Divmod;

template <>
struct Divmod<int64_t> {
  int64_t divisor = 1;

  Divmod() = default;
  explicit Divmod(int64_t d) : divisor(d) { TORCH_INTERNAL_ASSERT(d >= 1, "Divmod: divisor must be positive"); }

  __device__ __forceinline__ int64_t div(int64_t x) const { return x / divisor; }
  __device__ __forceinline__ void divmod(int64_t x, int64_t& quotient, int64_t& remainder) const {
    quotient = x / divisor;
    remainder = x - quotient * divisor;
  }
};

template <>
struct Divmod<int32_t> {
  int32_t divisor = 1;
  uint32_t multiplier = 0;  // ceil(2^(31 + log2_ceil(divisor)) / divisor); unused when divisor == 1
  uint32_t shift = 0;

  Divmod() = default;
  explicit Divmod(int64_t d) : divisor(static_cast<int32_t>(d)) {
    TORCH_INTERNAL_ASSERT(d >= 1 && d <= std::numeric_limits<int32_t>::max(), "Divmod: divisor out of range");
    if (d == 1) return;
    int log2_ceil = 0;
    while ((int64_t(1) << log2_ceil) < d) ++log2_ceil;
    multiplier = static_cast<uint32_t>(((uint64_t(1) << (31 + log2_ceil)) + d - 1) / d);
    shift = log2_ceil - 1;
  }

  __device__ __forceinline__ int32_t div(int32_t x) const {
    return divisor == 1 ? x : static_cast<int32_t>(__umulhi(static_cast<uint32_t>(x), multiplier) >> shift);
  }
  __device__ __forceinline__ void divmod(int32_t x, int32_t& quotient, int32_t& remainder) const {
    quotient = div(x);
    remainder = x - quotient * divisor;
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Launch sizing.
// ---------------------------------------------------------------------------------------------------------------

// Blocks for a grid-stride loop over `total` (> 0) elements.
inline unsigned elementwise_blocks(int64_t total) {
  return static_cast<unsigned>(std::min(ceil_div<int64_t>(total, kElementwiseThreads), kMaxElementwiseBlocks));
}

// Grid-stride loop bounds: for (index_t i = global_thread_index<index_t>(); i < total; i += grid_stride<index_t>())
template <typename index_t>
__device__ __forceinline__ index_t global_thread_index() {
  return static_cast<index_t>(blockIdx.x) * static_cast<index_t>(blockDim.x) + static_cast<index_t>(threadIdx.x);
}

template <typename index_t>
__device__ __forceinline__ index_t grid_stride() {
  return static_cast<index_t>(gridDim.x) * static_cast<index_t>(blockDim.x);
}

// ---------------------------------------------------------------------------------------------------------------
// Deterministic block-wide sum: a fixed shared-memory tree, so the result does not depend on scheduling.
// Every thread of the block must call it; every thread gets the sum. `scratch` holds kThreads values.
// ---------------------------------------------------------------------------------------------------------------

template <int kThreads, typename acc_t>
__device__ acc_t block_sum(acc_t value, acc_t* scratch) {
  static_assert((kThreads & (kThreads - 1)) == 0, "block_sum needs a power-of-two block");
  __syncthreads();  // a previous call's readers of scratch[0] are done before it is overwritten
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (static_cast<int>(threadIdx.x) < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
    __syncthreads();
  }
  return scratch[0];
}

}  // namespace cnn_ext::gpu
