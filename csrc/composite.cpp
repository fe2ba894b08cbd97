// Operators written from other operators, for every backend: the CUDA build (and the CUDA emulator) uses them as
// they are, the CPU kernels fall back on them. Compiled into the extension and into the CUDA emulator.
#include "composite.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/threshold_backward.h>

#include "checks.h"

namespace cnn_ext {

using c10::SymInt;
using c10::SymIntArrayRef;

// Gradient of the fused op with respect to the convolution's output: ReLU's derivative (torch's own
// threshold_backward), then max_pool2d_backward into the convolution output plane. Written once from other
// operators, so it serves every backend and symbolic shapes; only the convolution output size needs checks.h.
at::Tensor conv2d_maxpool_relu_backward_pool(const at::Tensor& grad_output, const at::Tensor& output,
                                             const at::Tensor& indices, const at::Tensor& input,
                                             const at::Tensor& weight, c10::IntArrayRef stride,
                                             c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                                             c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
                                             c10::IntArrayRef pool_padding, c10::IntArrayRef pool_dilation,
                                             bool ceil_mode) {
  auto s = check_conv2d_maxpool_relu_backward<SymInt>("cnn_ext.conv2d_maxpool_relu_backward_pool", grad_output,
                                                      output, indices, input, weight, stride, padding, dilation,
                                                      groups, pool_kernel_size, pool_stride, pool_padding,
                                                      pool_dilation, ceil_mode);
  static auto max_pool2d_backward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("cnn_ext::max_pool2d_backward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, SymIntArrayRef, c10::IntArrayRef,
                            c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, bool)>();
  auto conv_out = s.conv.output_sizes();
  return max_pool2d_backward.call(at::threshold_backward(grad_output, output, 0), indices, conv_out,
                                  pool_kernel_size, pool_stride, pool_padding, pool_dilation, ceil_mode);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_maxpool_relu_backward_composite(
    const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& indices, const at::Tensor& input,
    const at::Tensor& weight, c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
    int64_t groups, c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride, c10::IntArrayRef pool_padding,
    c10::IntArrayRef pool_dilation, bool ceil_mode, std::array<bool, 3> output_mask) {
  using ConvBackward = at::Tensor(const at::Tensor&, const at::Tensor&, SymIntArrayRef, c10::IntArrayRef,
                                  c10::IntArrayRef, c10::IntArrayRef, int64_t);
  static auto backward_pool =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("cnn_ext::conv2d_maxpool_relu_backward_pool", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, int64_t,
                            c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, bool)>();
  static auto backward_input =
      c10::Dispatcher::singleton().findSchemaOrThrow("cnn_ext::conv2d_backward_input", "").typed<ConvBackward>();
  static auto backward_weight =
      c10::Dispatcher::singleton().findSchemaOrThrow("cnn_ext::conv2d_backward_weight", "").typed<ConvBackward>();
  static auto backward_bias =
      c10::Dispatcher::singleton().findSchemaOrThrow("cnn_ext::conv2d_backward_bias", "").typed<at::Tensor(
          const at::Tensor&)>();
  check_conv2d_maxpool_relu_backward<SymInt>("cnn_ext.conv2d_maxpool_relu_backward", grad_output, output, indices,
                                             input, weight, stride, padding, dilation, groups, pool_kernel_size,
                                             pool_stride, pool_padding, pool_dilation, ceil_mode);
  const at::Tensor grad_conv =
      backward_pool.call(grad_output, output, indices, input, weight, stride, padding, dilation, groups,
                         pool_kernel_size, pool_stride, pool_padding, pool_dilation, ceil_mode);
  const auto none = [&] { return at::empty({0}, grad_output.options()); };
  return {output_mask[0] ? backward_input.call(grad_conv, weight, input.sym_sizes(), stride, padding, dilation, groups)
                         : none(),
          output_mask[1]
              ? backward_weight.call(grad_conv, input, weight.sym_sizes(), stride, padding, dilation, groups)
              : none(),
          output_mask[2] ? backward_bias.call(grad_conv) : none()};
}

}  // namespace cnn_ext
