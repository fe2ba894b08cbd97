// CUDA pooling kernels (device code; the launch configuration and the operators are in pool2d.cu): one thread per
// output element for the forward passes, one thread per input element for the backward passes, which gather from
// every window that can contain their element (no atomics, so the gradients are deterministic). Window and
// divisor rules follow PyTorch's CUDA kernels exactly.
//
// Included by pool2d.cu only (compiled by nvcc for a GPU, or by the host compiler for the CUDA emulator).
#pragma once


#include "../max_rule.h"
#include "common.cuh"

namespace cnn_ext::gpu {
namespace {

template <typename index_t>
struct PoolGeometry {
  index_t h, w;  // input plane
  index_t p, q;  // output plane
  index_t kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  // Divisors for decomposing linear indices into (plane, row, column); planes are (n, c) pairs.
  Divmod<index_t> by_p, by_q, by_h, by_w, by_stride_h, by_stride_w;
};

// ---------------------------------------------------------------------------------------------------------------
// Max pooling.
// ---------------------------------------------------------------------------------------------------------------

// As torch: taps scanned in row-major order, a tap replaces the maximum if strictly greater or NaN (so ties keep
// the first, and the last NaN wins). The index starts at the first in-bounds tap, so an all -inf window still
// points inside it. A window with no tap inside the input at all (dilation can step over it from the padding) gets
// index -1 and output -inf, as on the CPU; the backward gives it no gradient.
template <typename scalar_t, typename index_t>
__global__ void max_pool2d_kernel(const scalar_t* input, scalar_t* output, int64_t* indices,
                                  const PoolGeometry<index_t> g, const index_t total) {
  using acc_t = acc_type<scalar_t>;
  for (index_t idx = global_thread_index<index_t>(); idx < total; idx += grid_stride<index_t>()) {
    index_t rest, plane, p, q;
    g.by_q.divmod(idx, rest, q);
    g.by_p.divmod(rest, plane, p);
    const auto [h_first, h_end] = window_taps(p, g.stride_h, g.pad_h, g.kh, g.dil_h, g.h);
    const auto [w_first, w_end] = window_taps(q, g.stride_w, g.pad_w, g.kw, g.dil_w, g.w);
    const scalar_t* in_plane = input + plane * g.h * g.w;
    acc_t max_value = negative_infinity<acc_t>();
    const bool has_tap = h_first < h_end && w_first < w_end;
    index_t max_index = has_tap ? h_first * g.w + w_first : index_t(-1);
    for (index_t h = h_first; h < h_end; h += g.dil_h) {
      for (index_t w = w_first; w < w_end; w += g.dil_w) {
        const acc_t value = static_cast<acc_t>(in_plane[h * g.w + w]);
        if (takes_over(value, max_value)) {
          max_index = h * g.w + w;
          max_value = value;
        }
      }
    }
    output[idx] = static_cast<scalar_t>(max_value);
    indices[idx] = max_index;
  }
}

// Every input element sums grad_output over the windows whose recorded index is this element. Indices that are not
// an in-plane position (garbage passed by a caller) never match, so they cannot cause out-of-bounds accesses; unless
// first_bad is null (indices trusted), the lowest position in `indices` holding one (other than -1, a window with no
// tap) is left in *first_bad, which the host initialises to the largest value and turns into an error, as the CPU
// kernel does.
template <typename scalar_t, typename index_t>
__global__ void max_pool2d_backward_kernel(const scalar_t* grad_output, const int64_t* indices,
                                           scalar_t* grad_input, const PoolGeometry<index_t> g,
                                           const index_t total, const index_t indices_total,
                                           unsigned long long* first_bad) {
  using acc_t = acc_type<scalar_t>;
  const int64_t plane_in = static_cast<int64_t>(g.h) * g.w;
  for (index_t o = global_thread_index<index_t>(); first_bad != nullptr && o < indices_total;
       o += grid_stride<index_t>()) {
    const int64_t i = indices[o];
    if ((i < 0 || i >= plane_in) && i != -1) atomicMin(first_bad, static_cast<unsigned long long>(o));
  }
  const index_t window_h = (g.kh - 1) * g.dil_h + 1;
  const index_t window_w = (g.kw - 1) * g.dil_w + 1;
  for (index_t idx = global_thread_index<index_t>(); idx < total; idx += grid_stride<index_t>()) {
    index_t rest, plane, h, w;
    g.by_w.divmod(idx, rest, w);
    g.by_h.divmod(rest, plane, h);
    // Windows p whose span [p·stride - pad, p·stride - pad + window) contains h.
    const index_t padded_h = h + g.pad_h, padded_w = w + g.pad_w;
    const index_t p_begin = padded_h < window_h ? 0 : g.by_stride_h.div(padded_h - window_h) + 1;
    const index_t q_begin = padded_w < window_w ? 0 : g.by_stride_w.div(padded_w - window_w) + 1;
    const index_t p_end = minimum(g.by_stride_h.div(padded_h) + 1, g.p);
    const index_t q_end = minimum(g.by_stride_w.div(padded_w) + 1, g.q);
    const index_t plane_offset = plane * g.p * g.q;
    const int64_t position = h * g.w + w;
    acc_t gradient = 0;
    for (index_t p = p_begin; p < p_end; ++p) {
      for (index_t q = q_begin; q < q_end; ++q) {
        const index_t out = plane_offset + p * g.q + q;
        if (indices[out] == position) gradient += static_cast<acc_t>(grad_output[out]);
      }
    }
    grad_input[idx] = static_cast<scalar_t>(gradient);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Average pooling.
// ---------------------------------------------------------------------------------------------------------------

// A window clipped to the input, and the divisor of its sum, as torch computes them: the window may run into the
// right/bottom padding but not past it; count_include_pad counts the padding it covers; divisor_override (non-zero,
// checked) replaces both. Windows always contain an input pixel for the shapes pool2d_shape accepts.
template <typename index_t>
struct AvgWindow {
  index_t h_begin, h_end, w_begin, w_end;
  int64_t divisor;

  __device__ __forceinline__ AvgWindow(const PoolGeometry<index_t>& g, index_t p, index_t q, bool count_include_pad,
                                       int64_t divisor_override) {
    h_begin = p * g.stride_h - g.pad_h;
    w_begin = q * g.stride_w - g.pad_w;
    h_end = minimum(h_begin + g.kh, g.h + g.pad_h);
    w_end = minimum(w_begin + g.kw, g.w + g.pad_w);
    const int64_t padded_size = static_cast<int64_t>(h_end - h_begin) * (w_end - w_begin);
    h_begin = maximum(h_begin, index_t(0));
    w_begin = maximum(w_begin, index_t(0));
    h_end = minimum(h_end, g.h);
    w_end = minimum(w_end, g.w);
    if (divisor_override != 0) {
      divisor = divisor_override;
    } else if (count_include_pad) {
      divisor = padded_size;
    } else {
      divisor = static_cast<int64_t>(h_end - h_begin) * (w_end - w_begin);
    }
  }
};

template <typename scalar_t, typename index_t>
__global__ void avg_pool2d_kernel(const scalar_t* input, scalar_t* output, const PoolGeometry<index_t> g,
                                  const index_t total, const bool count_include_pad,
                                  const int64_t divisor_override) {
  using acc_t = acc_type<scalar_t>;
  for (index_t idx = global_thread_index<index_t>(); idx < total; idx += grid_stride<index_t>()) {
    index_t rest, plane, p, q;
    g.by_q.divmod(idx, rest, q);
    g.by_p.divmod(rest, plane, p);
    const AvgWindow<index_t> window(g, p, q, count_include_pad, divisor_override);
    const scalar_t* in_plane = input + plane * g.h * g.w;
    acc_t sum = 0;
    for (index_t h = window.h_begin; h < window.h_end; ++h) {
      for (index_t w = window.w_begin; w < window.w_end; ++w) sum += static_cast<acc_t>(in_plane[h * g.w + w]);
    }
    output[idx] = static_cast<scalar_t>(sum / static_cast<acc_t>(window.divisor));
  }
}

template <typename scalar_t, typename index_t>
__global__ void avg_pool2d_backward_kernel(const scalar_t* grad_output, scalar_t* grad_input,
                                           const PoolGeometry<index_t> g, const index_t total,
                                           const bool count_include_pad, const int64_t divisor_override) {
  using acc_t = acc_type<scalar_t>;
  for (index_t idx = global_thread_index<index_t>(); idx < total; idx += grid_stride<index_t>()) {
    index_t rest, plane, h, w;
    g.by_w.divmod(idx, rest, w);
    g.by_h.divmod(rest, plane, h);
    // Windows p whose span [p·stride - pad, p·stride - pad + k) contains h.
    const index_t padded_h = h + g.pad_h, padded_w = w + g.pad_w;
    const index_t p_begin = padded_h < g.kh ? 0 : g.by_stride_h.div(padded_h - g.kh) + 1;
    const index_t q_begin = padded_w < g.kw ? 0 : g.by_stride_w.div(padded_w - g.kw) + 1;
    const index_t p_end = minimum(g.by_stride_h.div(padded_h) + 1, g.p);
    const index_t q_end = minimum(g.by_stride_w.div(padded_w) + 1, g.q);
    const scalar_t* out_plane = grad_output + plane * g.p * g.q;
    acc_t gradient = 0;
    for (index_t p = p_begin; p < p_end; ++p) {
      for (index_t q = q_begin; q < q_end; ++q) {
        const AvgWindow<index_t> window(g, p, q, count_include_pad, divisor_override);
        // Divided in the element type before accumulating, as torch does (this matters for float16/bfloat16).
        gradient += static_cast<acc_t>(out_plane[p * g.q + q] / static_cast<scalar_t>(window.divisor));
      }
    }
    grad_input[idx] = static_cast<scalar_t>(gradient);
  }
}

}  // namespace
}  // namespace cnn_ext::gpu
