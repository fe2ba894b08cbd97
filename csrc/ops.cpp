// Operator schemas (declared once, here) and their Meta kernels.
//
// The Meta kernels compute output shapes with the same checks as the CPU and CUDA kernels (checks.h), on
// symbolic sizes, so FakeTensor, torch.compile and torch.export see every op without running it.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "composite.h"

namespace cnn_ext {
namespace {

using c10::SymInt;
using c10::SymIntArrayRef;

at::Tensor empty_like_sizes(const std::array<SymInt, 4>& sizes, const at::Tensor& like) {
  return at::empty_symint(sizes, like.options());
}

at::Tensor conv2d_meta(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                       int64_t groups) {
  auto s = check_conv2d<SymInt>("cnn_ext.conv2d", input, weight, bias, stride, padding, dilation, groups);
  return empty_like_sizes(s.output_sizes(), input);
}

at::Tensor conv2d_backward_input_meta(const at::Tensor& grad_output, const at::Tensor& weight,
                                      SymIntArrayRef input_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                      c10::IntArrayRef dilation, int64_t groups) {
  auto s = check_conv2d_backward_input<SymInt>("cnn_ext.conv2d_backward_input", grad_output, weight, input_size,
                                               stride, padding, dilation, groups);
  return empty_like_sizes(s.input_sizes(), grad_output);
}

at::Tensor conv2d_backward_weight_meta(const at::Tensor& grad_output, const at::Tensor& input,
                                       SymIntArrayRef weight_size, c10::IntArrayRef stride,
                                       c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  auto s = check_conv2d_backward_weight<SymInt>("cnn_ext.conv2d_backward_weight", grad_output, input, weight_size,
                                                stride, padding, dilation, groups);
  return empty_like_sizes(s.weight_sizes(), grad_output);
}

at::Tensor conv2d_backward_bias_meta(const at::Tensor& grad_output) {
  check_conv2d_backward_bias("cnn_ext.conv2d_backward_bias", grad_output);
  return at::empty_symint({grad_output.sym_size(1)}, grad_output.options());
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_meta(const at::Tensor& input, c10::IntArrayRef kernel_size,
                                                   c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                   c10::IntArrayRef dilation, bool ceil_mode) {
  auto s = check_pool2d<SymInt>("cnn_ext.max_pool2d", input, kernel_size, stride, padding, dilation, ceil_mode);
  auto out = s.output_sizes();
  return {at::empty_symint(out, input.options()), at::empty_symint(out, input.options().dtype(at::kLong))};
}

at::Tensor max_pool2d_backward_meta(const at::Tensor& grad_output, const at::Tensor& indices,
                                    SymIntArrayRef input_size, c10::IntArrayRef kernel_size,
                                    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                    bool ceil_mode) {
  auto s = check_max_pool2d_backward<SymInt>("cnn_ext.max_pool2d_backward", grad_output, indices, input_size,
                                             kernel_size, stride, padding, dilation, ceil_mode);
  return empty_like_sizes(s.input_sizes(), grad_output);
}

at::Tensor avg_pool2d_meta(const at::Tensor& input, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                           c10::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                           c10::optional<int64_t> divisor_override) {
  check_divisor_override("cnn_ext.avg_pool2d", divisor_override);
  const int64_t no_dilation[2] = {1, 1};
  auto s = check_pool2d<SymInt>("cnn_ext.avg_pool2d", input, kernel_size, stride, padding, no_dilation, ceil_mode);
  return empty_like_sizes(s.output_sizes(), input);
}

at::Tensor avg_pool2d_backward_meta(const at::Tensor& grad_output, SymIntArrayRef input_size,
                                    c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                    bool ceil_mode, bool count_include_pad, c10::optional<int64_t> divisor_override) {
  auto s = check_avg_pool2d_backward<SymInt>("cnn_ext.avg_pool2d_backward", grad_output, input_size, kernel_size,
                                             stride, padding, ceil_mode, divisor_override);
  return empty_like_sizes(s.input_sizes(), grad_output);
}

std::tuple<at::Tensor, at::Tensor> conv2d_maxpool_relu_meta(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride, c10::IntArrayRef pool_padding,
    c10::IntArrayRef pool_dilation, bool ceil_mode) {
  auto s = check_conv2d_maxpool_relu<SymInt>("cnn_ext.conv2d_maxpool_relu", input, weight, bias, stride, padding,
                                             dilation, groups, pool_kernel_size, pool_stride, pool_padding,
                                             pool_dilation, ceil_mode);
  auto out = s.pool.output_sizes();
  return {at::empty_symint(out, input.options()), at::empty_symint(out, input.options().dtype(at::kLong))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_meta(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, bool training,
    double eps) {
  const SymInt c = check_batch_norm<SymInt>("cnn_ext.batch_norm", input, weight, bias, running_mean, running_var,
                                            training, eps);
  return {at::empty_symint(input.sym_sizes(), input.options()), at::empty_symint({c}, input.options()),
          at::empty_symint({c}, input.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_meta(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, bool training,
    double eps) {
  const SymInt c = check_batch_norm<SymInt>("cnn_ext.batch_norm_relu", input, weight, bias, running_mean,
                                            running_var, training, eps);
  return {at::empty_symint(input.sym_sizes(), input.options()), at::empty_symint({c}, input.options()),
          at::empty_symint({c}, input.options()),
          at::empty_symint(input.sym_sizes(), input.options().dtype(at::kBool))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_meta(
    const at::Tensor& grad_output, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& var, bool training, double eps, std::array<bool, 3> output_mask,
    const c10::optional<at::Tensor>& kept) {
  const SymInt c = check_batch_norm_backward<SymInt>("cnn_ext.batch_norm_backward", grad_output, input, weight, mean,
                                                     var, eps, kept);
  const auto vector = [&](bool wanted) { return at::empty_symint({wanted ? c : SymInt(0)}, input.options()); };
  return {output_mask[0] ? at::empty_symint(input.sym_sizes(), input.options()) : vector(false),
          vector(output_mask[1]), vector(output_mask[2])};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_max_pool2d_meta(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, bool training,
    double eps, c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, bool ceil_mode) {
  const auto s = check_batch_norm_relu_max_pool2d<SymInt>("cnn_ext.batch_norm_relu_max_pool2d", input, weight, bias,
                                                          running_mean, running_var, training, eps, kernel_size,
                                                          stride, padding, dilation, ceil_mode);
  const auto out = s.output_sizes();
  return {at::empty_symint(out, input.options()), at::empty_symint({s.c}, input.options()),
          at::empty_symint({s.c}, input.options()), at::empty_symint(out, input.options().dtype(at::kLong))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_max_pool2d_backward_meta(
    const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& indices, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& var, bool training, double eps,
    std::array<bool, 3> output_mask) {
  const SymInt c = check_batch_norm_relu_max_pool2d_backward<SymInt>(
      "cnn_ext.batch_norm_relu_max_pool2d_backward", grad_output, output, indices, input, weight, mean, var, eps);
  const auto vector = [&](bool wanted) { return at::empty_symint({wanted ? c : SymInt(0)}, input.options()); };
  return {output_mask[0] ? at::empty_symint(input.sym_sizes(), input.options()) : vector(false),
          vector(output_mask[1]), vector(output_mask[2])};
}

std::tuple<at::Tensor, at::Tensor> dropout_meta(const at::Tensor& input, double p, int64_t seed) {
  check_dropout("cnn_ext.dropout", input, p);
  return {at::empty_symint(input.sym_sizes(), input.options()),
          at::empty_symint(input.sym_sizes(), input.options().dtype(at::kBool))};
}

at::Tensor dropout_backward_meta(const at::Tensor& grad_output, const at::Tensor& kept, double p) {
  check_dropout_backward("cnn_ext.dropout_backward", grad_output, kept, p);
  return at::empty_symint(grad_output.sym_sizes(), grad_output.options());
}

}  // namespace

TORCH_LIBRARY(cnn_ext, m) {
  m.def("conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
        "int groups) -> Tensor");
  m.def("conv2d_backward_input(Tensor grad_output, Tensor weight, SymInt[4] input_size, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def("conv2d_backward_weight(Tensor grad_output, Tensor input, SymInt[4] weight_size, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def("conv2d_backward_bias(Tensor grad_output) -> Tensor");
  m.def("max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
        "bool ceil_mode) -> (Tensor, Tensor)");
  m.def("max_pool2d_backward(Tensor grad_output, Tensor indices, SymInt[4] input_size, int[2] kernel_size, "
        "int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode) -> Tensor");
  m.def("avg_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode, "
        "bool count_include_pad, int? divisor_override) -> Tensor");
  m.def("avg_pool2d_backward(Tensor grad_output, SymInt[4] input_size, int[2] kernel_size, int[2] stride, "
        "int[2] padding, bool ceil_mode, bool count_include_pad, int? divisor_override) -> Tensor");
  // relu(max_pool2d(conv2d(input, weight, bias))) in one pass; indices are max_pool2d's, into the conv output.
  m.def("conv2d_maxpool_relu(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, int[2] pool_kernel_size, int[2] pool_stride, int[2] pool_padding, "
        "int[2] pool_dilation, bool ceil_mode) -> (Tensor, Tensor)");
  m.def("conv2d_maxpool_relu_backward_pool(Tensor grad_output, Tensor output, Tensor indices, Tensor input, "
        "Tensor weight, int[2] stride, int[2] padding, int[2] dilation, int groups, int[2] pool_kernel_size, "
        "int[2] pool_stride, int[2] pool_padding, int[2] pool_dilation, bool ceil_mode) -> Tensor");
  // The fused op's gradients with respect to (input, weight, bias), as far as output_mask asks (empty otherwise).
  m.def("conv2d_maxpool_relu_backward(Tensor grad_output, Tensor output, Tensor indices, Tensor input, "
        "Tensor weight, int[2] stride, int[2] padding, int[2] dilation, int groups, int[2] pool_kernel_size, "
        "int[2] pool_stride, int[2] pool_padding, int[2] pool_dilation, bool ceil_mode, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)");
  // Batch normalisation over dim 1: (output, mean, var), the statistics it normalised by (the batch's, var biased,
  // when training; else running_mean and running_var's values). Running statistics are updated by the caller.
  m.def("batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
        "bool training, float eps) -> (Tensor, Tensor, Tensor)");
  // relu(batch_norm(...)) in one pass: (output, mean, var, kept), kept the bool mask of the values ReLU kept (above
  // 0, or NaN), which the backward reads in place of the output (a quarter of its bytes in float32).
  m.def("batch_norm_relu(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
        "bool training, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients with respect to (input, weight, bias), as far as output_mask asks (empty otherwise); with kept
  // (batch_norm_relu's mask), those of relu(batch_norm(...)).
  m.def("batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor var, "
        "bool training, float eps, bool[3] output_mask, Tensor? kept=None) -> (Tensor, Tensor, Tensor)");
  // max_pool2d(relu(batch_norm(...))) in one pass: (output, mean, var, indices), indices max_pool2d's (into the
  // batch norm's output planes), the statistics batch_norm's. The normalised values are never written out.
  m.def("batch_norm_relu_max_pool2d(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
        "Tensor? running_var, bool training, float eps, int[2] kernel_size, int[2] stride, int[2] padding, "
        "int[2] dilation, bool ceil_mode) -> (Tensor, Tensor, Tensor, Tensor)");
  // Its gradients with respect to (input, weight, bias), as far as output_mask asks (empty otherwise), from the
  // pooled output's gradient, the forward's output and indices (which tell where ReLU kept the winners).
  m.def("batch_norm_relu_max_pool2d_backward(Tensor grad_output, Tensor output, Tensor indices, Tensor input, "
        "Tensor? weight, Tensor mean, Tensor var, bool training, float eps, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)");
  // Dropout with probability p: (output, kept), kept the bool mask of the values kept (and scaled by 1 / (1 - p)).
  // The mask is a function of seed and each value's position (cnn_ext.functional.dropout draws the seed from
  // torch's generator).
  m.def("dropout(Tensor input, float p, int seed) -> (Tensor, Tensor)");
  // The input's gradient: grad_output where kept, scaled by 1 / (1 - p), else 0.
  m.def("dropout_backward(Tensor grad_output, Tensor kept, float p) -> Tensor");
}

TORCH_LIBRARY_IMPL(cnn_ext, CompositeExplicitAutograd, m) {
  m.impl("conv2d_maxpool_relu_backward_pool", &conv2d_maxpool_relu_backward_pool);
  m.impl("conv2d_maxpool_relu_backward", &conv2d_maxpool_relu_backward_composite);
}

TORCH_LIBRARY_IMPL(cnn_ext, Meta, m) {
  m.impl("conv2d", &conv2d_meta);
  m.impl("conv2d_backward_input", &conv2d_backward_input_meta);
  m.impl("conv2d_backward_weight", &conv2d_backward_weight_meta);
  m.impl("conv2d_backward_bias", &conv2d_backward_bias_meta);
  m.impl("max_pool2d", &max_pool2d_meta);
  m.impl("max_pool2d_backward", &max_pool2d_backward_meta);
  m.impl("avg_pool2d", &avg_pool2d_meta);
  m.impl("avg_pool2d_backward", &avg_pool2d_backward_meta);
  m.impl("conv2d_maxpool_relu", &conv2d_maxpool_relu_meta);
  m.impl("batch_norm", &batch_norm_meta);
  m.impl("batch_norm_relu", &batch_norm_relu_meta);
  m.impl("batch_norm_backward", &batch_norm_backward_meta);
  m.impl("batch_norm_relu_max_pool2d", &batch_norm_relu_max_pool2d_meta);
  m.impl("batch_norm_relu_max_pool2d_backward", &batch_norm_relu_max_pool2d_backward_meta);
  m.impl("dropout", &dropout_meta);
  m.impl("dropout_backward", &dropout_backward_meta);
}

}  // namespace cnn_ext

