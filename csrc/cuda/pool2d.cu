// CUDA pooling kernels: one thread per output element for the forward passes, one thread per input element for
// the backward passes, which gather from every window that can contain their element (no atomics, so the
// gradients are deterministic). Window and divisor rules follow PyTorch's CUDA kernels exactly.
//
// Semantics, argument checks and errors are those of csrc/checks.h, shared with the CPU and Meta kernels.
#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/cuda/NumericLimits.cuh>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
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

template <typename index_t>
PoolGeometry<index_t> make_geometry(const PoolShape<int64_t>& s) {
  PoolGeometry<index_t> g;
  g.h = s.h, g.w = s.w, g.p = s.p, g.q = s.q;
  g.kh = s.kh, g.kw = s.kw, g.stride_h = s.stride_h, g.stride_w = s.stride_w;
  g.pad_h = s.pad_h, g.pad_w = s.pad_w, g.dil_h = s.dil_h, g.dil_w = s.dil_w;
  // pool2d_shape guarantees H, W, P, Q >= 1.
  g.by_p = Divmod<index_t>(s.p), g.by_q = Divmod<index_t>(s.q);
  g.by_h = Divmod<index_t>(s.h), g.by_w = Divmod<index_t>(s.w);
  g.by_stride_h = Divmod<index_t>(s.stride_h), g.by_stride_w = Divmod<index_t>(s.stride_w);
  return g;
}

// 32-bit indices when the tensors and the window extents are small (see fits_int32).
bool pool_fits_int32(const PoolShape<int64_t>& s) {
  return fits_int32({s.n * s.c * s.h * s.w, s.n * s.c * s.p * s.q, (s.kh - 1) * s.dil_h + 1,
                     (s.kw - 1) * s.dil_w + 1, s.stride_h, s.stride_w, s.pad_h, s.pad_w});
}

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
    acc_t max_value = at::numeric_limits<acc_t>::lower_bound();
    const bool has_tap = h_first < h_end && w_first < w_end;
    index_t max_index = has_tap ? h_first * g.w + w_first : index_t(-1);
    for (index_t h = h_first; h < h_end; h += g.dil_h) {
      for (index_t w = w_first; w < w_end; w += g.dil_w) {
        const acc_t value = static_cast<acc_t>(in_plane[h * g.w + w]);
        if (value > max_value || at::_isnan(value)) {
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
// an in-plane position (garbage passed by a caller) never match, so they cannot cause out-of-bounds accesses.
template <typename scalar_t, typename index_t>
__global__ void max_pool2d_backward_kernel(const scalar_t* grad_output, const int64_t* indices,
                                           scalar_t* grad_input, const PoolGeometry<index_t> g,
                                           const index_t total) {
  using acc_t = acc_type<scalar_t>;
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

// ---------------------------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> max_pool2d_cuda(const at::Tensor& input_arg, c10::IntArrayRef kernel_size,
                                                   c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                   c10::IntArrayRef dilation, bool ceil_mode) {
  const char* op = "cnn_ext.max_pool2d";
  const auto shape = check_pool2d<int64_t>(op, input_arg, kernel_size, stride, padding, dilation, ceil_mode);
  check_cuda_dtype(op, input_arg, "input");
  const c10::cuda::CUDAGuard device_guard(input_arg.device());
  const at::Tensor input = input_arg.contiguous();
  at::Tensor output = at::empty(shape.output_sizes(), input.options());
  at::Tensor indices = at::empty(shape.output_sizes(), input.options().dtype(at::kLong));
  const int64_t total = output.numel();
  if (total == 0) return {output, indices};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cnn_ext_max_pool2d_cuda", [&] {
    dispatch_index_type(pool_fits_int32(shape), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      max_pool2d_kernel<scalar_t, index_t><<<elementwise_blocks(total), kElementwiseThreads, 0, stream>>>(
          input.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(),
          indices.mutable_data_ptr<int64_t>(), make_geometry<index_t>(shape), static_cast<index_t>(total));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {output, indices};
}

at::Tensor max_pool2d_backward_cuda(const at::Tensor& grad_output_arg, const at::Tensor& indices_arg,
                                    c10::IntArrayRef input_size, c10::IntArrayRef kernel_size,
                                    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                    bool ceil_mode) {
  const char* op = "cnn_ext.max_pool2d_backward";
  const auto shape = check_max_pool2d_backward<int64_t>(op, grad_output_arg, indices_arg, input_size, kernel_size,
                                                        stride, padding, dilation, ceil_mode);
  check_cuda_dtype(op, grad_output_arg, "grad_output");
  const c10::cuda::CUDAGuard device_guard(grad_output_arg.device());
  const at::Tensor grad_output = grad_output_arg.contiguous();
  const at::Tensor indices = indices_arg.contiguous();
  at::Tensor grad_input = at::empty(shape.input_sizes(), grad_output.options());
  const int64_t total = grad_input.numel();
  if (total == 0) return grad_input;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                  "cnn_ext_max_pool2d_backward_cuda", [&] {
    dispatch_index_type(pool_fits_int32(shape), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      max_pool2d_backward_kernel<scalar_t, index_t><<<elementwise_blocks(total), kElementwiseThreads, 0, stream>>>(
          grad_output.const_data_ptr<scalar_t>(), indices.const_data_ptr<int64_t>(),
          grad_input.mutable_data_ptr<scalar_t>(), make_geometry<index_t>(shape), static_cast<index_t>(total));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_input;
}

at::Tensor avg_pool2d_cuda(const at::Tensor& input_arg, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                           c10::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                           c10::optional<int64_t> divisor_override) {
  const char* op = "cnn_ext.avg_pool2d";
  check_divisor_override(op, divisor_override);
  const int64_t no_dilation[2] = {1, 1};
  const auto shape = check_pool2d<int64_t>(op, input_arg, kernel_size, stride, padding, no_dilation, ceil_mode);
  check_cuda_dtype(op, input_arg, "input");
  const c10::cuda::CUDAGuard device_guard(input_arg.device());
  const at::Tensor input = input_arg.contiguous();
  at::Tensor output = at::empty(shape.output_sizes(), input.options());
  const int64_t total = output.numel();
  if (total == 0) return output;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cnn_ext_avg_pool2d_cuda", [&] {
    dispatch_index_type(pool_fits_int32(shape), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      avg_pool2d_kernel<scalar_t, index_t><<<elementwise_blocks(total), kElementwiseThreads, 0, stream>>>(
          input.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), make_geometry<index_t>(shape),
          static_cast<index_t>(total), count_include_pad, divisor_override.value_or(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return output;
}

at::Tensor avg_pool2d_backward_cuda(const at::Tensor& grad_output_arg, c10::IntArrayRef input_size,
                                    c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                    bool ceil_mode, bool count_include_pad,
                                    c10::optional<int64_t> divisor_override) {
  const char* op = "cnn_ext.avg_pool2d_backward";
  const auto shape = check_avg_pool2d_backward<int64_t>(op, grad_output_arg, input_size, kernel_size, stride,
                                                        padding, ceil_mode, divisor_override);
  check_cuda_dtype(op, grad_output_arg, "grad_output");
  const c10::cuda::CUDAGuard device_guard(grad_output_arg.device());
  const at::Tensor grad_output = grad_output_arg.contiguous();
  at::Tensor grad_input = at::empty(shape.input_sizes(), grad_output.options());
  const int64_t total = grad_input.numel();
  if (total == 0) return grad_input;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                  "cnn_ext_avg_pool2d_backward_cuda", [&] {
    dispatch_index_type(pool_fits_int32(shape), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      avg_pool2d_backward_kernel<scalar_t, index_t><<<elementwise_blocks(total), kElementwiseThreads, 0, stream>>>(
          grad_output.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(),
          make_geometry<index_t>(shape), static_cast<index_t>(total), count_include_pad,
          divisor_override.value_or(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(cnn_ext, CUDA, m) {
  m.impl("max_pool2d", &max_pool2d_cuda);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cuda);
  m.impl("avg_pool2d", &avg_pool2d_cuda);
  m.impl("avg_pool2d_backward", &avg_pool2d_backward_cuda);
}

}  // namespace cnn_ext::gpu
