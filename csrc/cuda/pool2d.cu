// CUDA pooling operators: argument checks (csrc/checks.h, shared with the CPU and Meta kernels), the launch
// configuration of the kernels in pool2d_kernels.cuh and their registration. Compiled by nvcc for the GPU and by
// the host compiler for the CUDA emulator (csrc/emulator/pool2d.cpp).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>

#include "../checks.h"
#include "../saved_indices.h"
#include "pool2d_kernels.cuh"
#include "runtime.cuh"

namespace cnn_ext::gpu {
namespace {

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


std::tuple<at::Tensor, at::Tensor> max_pool2d_cuda(const at::Tensor& input_arg, c10::IntArrayRef kernel_size,
                                                   c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                   c10::IntArrayRef dilation, bool ceil_mode) {
  const char* op = "cnn_ext.max_pool2d";
  const auto shape = check_pool2d<int64_t>(op, input_arg, kernel_size, stride, padding, dilation, ceil_mode);
  check_cuda_dtype(op, input_arg, "input");
  const DeviceGuard device_guard(input_arg.device());
  const at::Tensor input = input_arg.contiguous();
  at::Tensor output = at::empty(shape.output_sizes(), input.options());
  at::Tensor indices = at::empty(shape.output_sizes(), input.options().dtype(at::kLong));
  const int64_t total = output.numel();
  if (total == 0) return {output, indices};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cnn_ext_max_pool2d_cuda", [&] {
    dispatch_index_type(pool_fits_int32(shape), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      launch<max_pool2d_kernel<scalar_t, index_t>>({elementwise_blocks(total), kElementwiseThreads},
             input.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(),
             indices.mutable_data_ptr<int64_t>(), make_geometry<index_t>(shape), static_cast<index_t>(total));
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
  const DeviceGuard device_guard(grad_output_arg.device());
  const at::Tensor grad_output = grad_output_arg.contiguous();
  const at::Tensor indices = indices_arg.contiguous();
  at::Tensor grad_input = at::empty(shape.input_sizes(), grad_output.options());
  const int64_t total = grad_input.numel();
  if (total == 0) return grad_input;
  // The indices are checked unless autograd saved them from our forward (saved_indices.h) or the stream is being
  // captured into a CUDA graph, where nothing may wait for the device. The kernel leaves in first_bad the lowest
  // position in `indices` that holds no position of the input plane; reading it back waits for the kernel.
  const bool check = !SavedIndicesScope::active() && !stream_is_capturing();
  const at::Tensor first_bad =
      check ? at::full({1}, std::numeric_limits<int64_t>::max(), indices.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                  "cnn_ext_max_pool2d_backward_cuda", [&] {
    dispatch_index_type(pool_fits_int32(shape), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      launch<max_pool2d_backward_kernel<scalar_t, index_t>>({elementwise_blocks(total), kElementwiseThreads},
             grad_output.const_data_ptr<scalar_t>(), indices.const_data_ptr<int64_t>(),
             grad_input.mutable_data_ptr<scalar_t>(), make_geometry<index_t>(shape), static_cast<index_t>(total),
             static_cast<index_t>(indices.numel()),
             check ? reinterpret_cast<unsigned long long*>(first_bad.mutable_data_ptr<int64_t>()) : nullptr);
    });
  });
  if (check) {
    const int64_t position = first_bad.item<int64_t>();
    if (position != std::numeric_limits<int64_t>::max()) {
      fail_bad_max_pool_index(op, shape, position, indices.view(-1)[position].item<int64_t>(), "input plane", "H*W");
    }
  }
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
  const DeviceGuard device_guard(input_arg.device());
  const at::Tensor input = input_arg.contiguous();
  at::Tensor output = at::empty(shape.output_sizes(), input.options());
  const int64_t total = output.numel();
  if (total == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cnn_ext_avg_pool2d_cuda", [&] {
    dispatch_index_type(pool_fits_int32(shape), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      launch<avg_pool2d_kernel<scalar_t, index_t>>({elementwise_blocks(total), kElementwiseThreads},
             input.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), make_geometry<index_t>(shape),
             static_cast<index_t>(total), count_include_pad, divisor_override.value_or(0));
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
  const DeviceGuard device_guard(grad_output_arg.device());
  const at::Tensor grad_output = grad_output_arg.contiguous();
  at::Tensor grad_input = at::empty(shape.input_sizes(), grad_output.options());
  const int64_t total = grad_input.numel();
  if (total == 0) return grad_input;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                  "cnn_ext_avg_pool2d_backward_cuda", [&] {
    dispatch_index_type(pool_fits_int32(shape), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      launch<avg_pool2d_backward_kernel<scalar_t, index_t>>({elementwise_blocks(total), kElementwiseThreads},
             grad_output.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(),
             make_geometry<index_t>(shape), static_cast<index_t>(total), count_include_pad,
             divisor_override.value_or(0));
    });
  });
  return grad_input;
}

}  // namespace

CNN_EXT_CUDA_KERNELS(m) {
  m.impl("max_pool2d", &max_pool2d_cuda);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cuda);
  m.impl("avg_pool2d", &avg_pool2d_cuda);
  m.impl("avg_pool2d_backward", &avg_pool2d_backward_cuda);
}

}  // namespace cnn_ext::gpu
