// Operators written from other operators (composite.cpp): they serve every backend, and the CPU kernels fall back on
// them.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <tuple>

namespace cnn_ext {

// cnn_ext.conv2d_maxpool_relu_backward_pool: the gradient of the fused op's convolution output, from the gradient of
// its pooled output: ReLU's derivative, then max_pool2d_backward into the convolution's output plane.
at::Tensor conv2d_maxpool_relu_backward_pool(const at::Tensor& grad_output, const at::Tensor& output,
                                             const at::Tensor& indices, const at::Tensor& input,
                                             const at::Tensor& weight, c10::IntArrayRef stride,
                                             c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                                             c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
                                             c10::IntArrayRef pool_padding, c10::IntArrayRef pool_dilation,
                                             bool ceil_mode);

// cnn_ext.conv2d_maxpool_relu_backward as conv2d_maxpool_relu_backward_pool followed by the convolution's backward
// ops; a gradient not asked for in output_mask (input, weight, bias) is an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_maxpool_relu_backward_composite(
    const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& indices, const at::Tensor& input,
    const at::Tensor& weight, c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
    int64_t groups, c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride, c10::IntArrayRef pool_padding,
    c10::IntArrayRef pool_dilation, bool ceil_mode, std::array<bool, 3> output_mask);

}  // namespace cnn_ext
