// CUDA forward kernel of the fused conv2d + bias + max_pool2d + ReLU operator (the MNIST layer pattern); device
// code; the launch and the operator are in fused.cu.
//
// One launch, no workspace: one thread per pooled output element computes the convolution values of its pool
// window directly (each a dot product over C/groups·R·S taps), keeps the maximum as max_pool2d_kernel does, and
// writes relu(maximum) and the maximum's index into the convolution's output plane. The convolution output is
// never stored. Blocks are laid out per output channel (grid y), so a block's threads share that channel's
// weights, staged once in shared memory (read from global memory when they do not fit). For MNIST's layers
// (K = 10/20, C·R·S = 25/250, 2×2 pooling) this is a few hundred blocks and one launch per layer.
//
// Exactly as the unfused ops: each convolution value is summed in the unfused CUDA kernels' order (see conv_at) and
// rounded to the element type before it is compared (float16/bfloat16 accumulate in float32 and round once, as
// the conv kernels store them); taps are scanned in row-major window order, a tap replaces the maximum if strictly
// greater or NaN (ties keep the first, NaN propagates), and a window with no tap inside the convolution output gets
// index -1 and output relu(-inf) = 0. So the result is bit for bit conv2d -> max_pool2d -> relu on CUDA, except
// where the unfused convolution splits its GEMM's K (C/groups·R·S > 256 with few output tiles), whose partial sums
// round differently. Pooling windows that overlap (stride < kernel) recompute the shared convolution values: cheap
// at these sizes, and it keeps every thread independent.
//
// Included by fused.cu only (compiled by nvcc for a GPU, or by the host compiler for the CUDA emulator).
#pragma once


#include "../max_rule.h"
#include "common.cuh"

namespace cnn_ext::gpu {
namespace {

// Weights of one output channel staged in shared memory when C/groups·R·S is at most this (32 KiB in float64).
constexpr int64_t kMaxSharedWeights = 4096;

template <typename index_t>
struct FusedGeometry {
  // Convolution: input N×C×H×W, weight K×(C/groups)×R×S, output (never stored) N×K×P×Q.
  index_t n, c, h, w, k, r, s, p, q, cg, kg;
  index_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  // Pooling of the P×Q plane into PP×PQ.
  index_t pp, pq;
  index_t pool_kh, pool_kw, pool_stride_h, pool_stride_w, pool_pad_h, pool_pad_w, pool_dil_h, pool_dil_w;
  index_t weights_per_channel;  // C/groups·R·S
  // Divisors for decomposing a linear (img, pooled row, pooled column) position.
  Divmod<index_t> by_ppq, by_pq;
};

// Convolution output [img][channel k][ph][pw] before the bias: the sum over (c, r, s) in that order, in acc_t, with
// padding taps contributing 0·weight. This is the order and arithmetic of the unfused CUDA convolution (the direct
// kernel, and the implicit GEMM when it does not split K), so the values agree with it bit for bit there.
// `in_group` points at channel 0 of k's group in image img; `weights` at k's C/groups×R×S weights.
template <typename scalar_t, typename index_t>
__device__ __forceinline__ acc_type<scalar_t> conv_at(const scalar_t* in_group, const scalar_t* weights,
                                                      const FusedGeometry<index_t>& g, index_t ph, index_t pw) {
  using acc_t = acc_type<scalar_t>;
  const index_t h0 = ph * g.stride_h - g.pad_h;
  const index_t w0 = pw * g.stride_w - g.pad_w;
  acc_t sum = 0;
  for (index_t c = 0; c < g.cg; ++c) {
    const scalar_t* in_plane = in_group + c * g.h * g.w;
    const scalar_t* w_plane = weights + c * g.r * g.s;
    for (index_t r = 0; r < g.r; ++r) {
      const index_t h = h0 + r * g.dil_h;
      const bool row_inside = h >= 0 && h < g.h;
      for (index_t s = 0; s < g.s; ++s) {
        const index_t w = w0 + s * g.dil_w;
        const acc_t x = row_inside && w >= 0 && w < g.w ? static_cast<acc_t>(in_plane[h * g.w + w]) : acc_t(0);
        sum += x * static_cast<acc_t>(w_plane[r * g.s + s]);
      }
    }
  }
  return sum;
}

// Grid: x over the N·PP·PQ pooled positions (grid-strided), y over output channels (grid-strided). Every thread of
// a block reaches the __syncthreads: they sit outside the position loop.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kElementwiseThreads)
    conv2d_maxpool_relu_kernel(const scalar_t* input, const scalar_t* weight, const scalar_t* bias,
                               scalar_t* output, int64_t* indices, const FusedGeometry<index_t> g,
                               const bool weights_in_shared) {
  using acc_t = acc_type<scalar_t>;
  __shared__ scalar_t shared_weights[kMaxSharedWeights];
  const index_t positions = g.n * g.by_ppq.divisor;  // per channel
  const index_t plane_in = g.h * g.w;
  for (index_t k = blockIdx.y; k < g.k; k += gridDim.y) {
    const scalar_t* channel_weights = weight + k * g.weights_per_channel;
    if (weights_in_shared) {
      __syncthreads();  // the previous channel's readers are done
      for (index_t i = threadIdx.x; i < g.weights_per_channel; i += blockDim.x) {
        shared_weights[i] = channel_weights[i];
      }
      __syncthreads();
      channel_weights = shared_weights;
    }
    const acc_t channel_bias = bias != nullptr ? static_cast<acc_t>(bias[k]) : acc_t(0);
    const bool has_bias = bias != nullptr;
    const index_t group = k / g.kg;
    for (index_t m = global_thread_index<index_t>(); m < positions; m += grid_stride<index_t>()) {
      index_t img, ppq, pool_row, pool_col;
      g.by_ppq.divmod(m, img, ppq);
      g.by_pq.divmod(ppq, pool_row, pool_col);
      const scalar_t* in_group = input + (img * g.c + group * g.cg) * plane_in;
      // The pool window over the convolution output plane, clipped as in max_pool2d_kernel.
      const auto [h_first, h_end] = window_taps(pool_row, g.pool_stride_h, g.pool_pad_h, g.pool_kh, g.pool_dil_h, g.p);
      const auto [w_first, w_end] = window_taps(pool_col, g.pool_stride_w, g.pool_pad_w, g.pool_kw, g.pool_dil_w, g.q);
      acc_t max_value = negative_infinity<acc_t>();
      const bool has_tap = h_first < h_end && w_first < w_end;
      index_t max_index = has_tap ? h_first * g.q + w_first : index_t(-1);
      for (index_t ph = h_first; ph < h_end; ph += g.pool_dil_h) {
        for (index_t pw = w_first; pw < w_end; pw += g.pool_dil_w) {
          // Rounded to the element type, as the convolution kernels store it, then compared as max_pool2d does.
          acc_t sum = conv_at<scalar_t, index_t>(in_group, channel_weights, g, ph, pw);
          if (has_bias) sum += channel_bias;
          const acc_t value = static_cast<acc_t>(static_cast<scalar_t>(sum));
          if (takes_over(value, max_value)) {
            max_index = ph * g.q + pw;
            max_value = value;
          }
        }
      }
      const index_t out = (img * g.k + k) * g.by_ppq.divisor + ppq;
      // ReLU; NaN passes through, -inf (no tap) becomes 0.
      output[out] = static_cast<scalar_t>(relu(max_value));
      indices[out] = max_index;
    }
  }
}

}  // namespace
}  // namespace cnn_ext::gpu
