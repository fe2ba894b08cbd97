// Autograd for the forward operators, in C++: a torch::autograd::Function per op, registered for the Autograd
// dispatch key (as PyTorch's custom C++ operator tutorial does). Eager calls from cnn_ext.functional, direct
// torch.ops.cnn_ext calls, torch.compile and torch.export all take this one path. Each backward calls the backward
// operators through the dispatcher, so it serves every device (and FakeTensors, through their Meta kernels).
//
// The backward operators have no derivatives of their own: differentiating a gradient (create_graph=True) raises,
// naming the op, instead of silently treating the gradient as a constant.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "saved_indices.h"

namespace cnn_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using ConvBackward = at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef, c10::IntArrayRef,
                                c10::IntArrayRef, c10::IntArrayRef, int64_t);

// Inside a backward, grad mode is on only when the caller asked for create_graph=True.
void refuse_double_backward(const char* op_name) {
  TORCH_CHECK(!at::GradMode::is_enabled(), op_name,
              ": double backward is not supported (the gradient was requested with create_graph=True, but cnn_ext's "
              "backward operators have no derivatives of their own)");
}

std::vector<int64_t> ints(AutogradContext* ctx, const char* key) { return ctx->saved_data[key].toIntVector(); }

// ---------------------------------------------------------------------------------------------------------------
// conv2d
// ---------------------------------------------------------------------------------------------------------------

struct Conv2d : public torch::autograd::Function<Conv2d> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, c10::IntArrayRef stride, c10::IntArrayRef padding,
                            c10::IntArrayRef dilation, int64_t groups) {
    ctx->save_for_backward({input, weight});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["has_bias"] = bias.has_value();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static auto conv2d =
        op<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, c10::IntArrayRef,
                      c10::IntArrayRef, c10::IntArrayRef, int64_t)>("cnn_ext::conv2d");
    return conv2d.call(input, weight, bias, stride, padding, dilation, groups);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    refuse_double_backward("cnn_ext.conv2d");
    static auto backward_input = op<ConvBackward>("cnn_ext::conv2d_backward_input");
    static auto backward_weight = op<ConvBackward>("cnn_ext::conv2d_backward_weight");
    static auto backward_bias = op<at::Tensor(const at::Tensor&)>("cnn_ext::conv2d_backward_bias");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &weight = saved[1], &grad = grads[0];
    const auto stride = ints(ctx, "stride"), padding = ints(ctx, "padding"), dilation = ints(ctx, "dilation");
    const int64_t groups = ctx->saved_data["groups"].toInt();
    at::Tensor grad_input, grad_weight, grad_bias;
    if (ctx->needs_input_grad(0)) {
      grad_input = backward_input.call(grad, weight, input.sym_sizes(), stride, padding, dilation, groups);
    }
    if (ctx->needs_input_grad(1)) {
      grad_weight = backward_weight.call(grad, input, weight.sym_sizes(), stride, padding, dilation, groups);
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) grad_bias = backward_bias.call(grad);
    return {grad_input, grad_weight, grad_bias, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor conv2d_autograd(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                           int64_t groups) {
  return Conv2d::apply(input, weight, bias, stride, padding, dilation, groups);
}

// ---------------------------------------------------------------------------------------------------------------
// max_pool2d: (output, indices); indices are not differentiable, and no zeros are made for their gradient.
// ---------------------------------------------------------------------------------------------------------------

struct MaxPool2d : public torch::autograd::Function<MaxPool2d> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, c10::IntArrayRef kernel_size,
                               c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                               bool ceil_mode) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static auto max_pool2d = op<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, bool)>(
        "cnn_ext::max_pool2d");
    auto [output, indices] = max_pool2d.call(input, kernel_size, stride, padding, dilation, ceil_mode);
    ctx->mark_non_differentiable({indices});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({indices});
    ctx->saved_data["input_size"] = input.sym_sizes();
    ctx->saved_data["kernel_size"] = kernel_size;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["ceil_mode"] = ceil_mode;
    return {output, indices};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    refuse_double_backward("cnn_ext.max_pool2d");
    static auto backward = op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef, c10::IntArrayRef,
                                         c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, bool)>(
        "cnn_ext::max_pool2d_backward");
    const auto input_size = ctx->saved_data["input_size"].toSymIntVector();
    const SavedIndicesScope saved_indices;  // the forward's own indices (saved_indices.h)
    const at::Tensor grad_input =
        backward.call(grads[0], ctx->get_saved_variables()[0], input_size, ints(ctx, "kernel_size"),
                      ints(ctx, "stride"), ints(ctx, "padding"), ints(ctx, "dilation"),
                      ctx->saved_data["ceil_mode"].toBool());
    return {grad_input, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> max_pool2d_autograd(const at::Tensor& input, c10::IntArrayRef kernel_size,
                                                       c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                       c10::IntArrayRef dilation, bool ceil_mode) {
  auto outputs = MaxPool2d::apply(input, kernel_size, stride, padding, dilation, ceil_mode);
  return {outputs[0], outputs[1]};
}

// ---------------------------------------------------------------------------------------------------------------
// avg_pool2d
// ---------------------------------------------------------------------------------------------------------------

struct AvgPool2d : public torch::autograd::Function<AvgPool2d> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, c10::IntArrayRef kernel_size,
                            c10::IntArrayRef stride, c10::IntArrayRef padding, bool ceil_mode,
                            bool count_include_pad, c10::optional<int64_t> divisor_override) {
    ctx->saved_data["input_size"] = input.sym_sizes();
    ctx->saved_data["kernel_size"] = kernel_size;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["ceil_mode"] = ceil_mode;
    ctx->saved_data["count_include_pad"] = count_include_pad;
    ctx->saved_data["divisor_override"] = divisor_override;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static auto avg_pool2d = op<at::Tensor(const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
                                           bool, bool, c10::optional<int64_t>)>("cnn_ext::avg_pool2d");
    return avg_pool2d.call(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    refuse_double_backward("cnn_ext.avg_pool2d");
    static auto backward = op<at::Tensor(const at::Tensor&, c10::SymIntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
                                         c10::IntArrayRef, bool, bool, c10::optional<int64_t>)>(
        "cnn_ext::avg_pool2d_backward");
    const auto input_size = ctx->saved_data["input_size"].toSymIntVector();
    const auto divisor = ctx->saved_data["divisor_override"];
    const at::Tensor grad_input =
        backward.call(grads[0], input_size, ints(ctx, "kernel_size"), ints(ctx, "stride"), ints(ctx, "padding"),
                      ctx->saved_data["ceil_mode"].toBool(), ctx->saved_data["count_include_pad"].toBool(),
                      divisor.isNone() ? c10::nullopt : c10::optional<int64_t>(divisor.toInt()));
    return {grad_input, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor avg_pool2d_autograd(const at::Tensor& input, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                               c10::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                               c10::optional<int64_t> divisor_override) {
  return AvgPool2d::apply(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override);
}

// ---------------------------------------------------------------------------------------------------------------
// conv2d_maxpool_relu: (output, indices); the backward is the fused backward op, for the gradients asked for.
// ---------------------------------------------------------------------------------------------------------------

struct Conv2dMaxPoolRelu : public torch::autograd::Function<Conv2dMaxPoolRelu> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                               c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                               c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
                               c10::IntArrayRef pool_padding, c10::IntArrayRef pool_dilation, bool ceil_mode) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static auto fused = op<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, c10::IntArrayRef, c10::IntArrayRef,
        c10::IntArrayRef, int64_t, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, bool)>(
        "cnn_ext::conv2d_maxpool_relu");
    auto [output, indices] = fused.call(input, weight, bias, stride, padding, dilation, groups, pool_kernel_size,
                                        pool_stride, pool_padding, pool_dilation, ceil_mode);
    ctx->mark_non_differentiable({indices});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({input, weight, output, indices});
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["pool_kernel_size"] = pool_kernel_size;
    ctx->saved_data["pool_stride"] = pool_stride;
    ctx->saved_data["pool_padding"] = pool_padding;
    ctx->saved_data["pool_dilation"] = pool_dilation;
    ctx->saved_data["ceil_mode"] = ceil_mode;
    return {output, indices};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list none(12);
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)};
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2])) return none;
    refuse_double_backward("cnn_ext.conv2d_maxpool_relu");
    static auto backward = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, int64_t, c10::IntArrayRef, c10::IntArrayRef,
        c10::IntArrayRef, c10::IntArrayRef, bool, std::array<bool, 3>)>("cnn_ext::conv2d_maxpool_relu_backward");
    const auto saved = ctx->get_saved_variables();
    const SavedIndicesScope saved_indices;  // the forward's own indices (saved_indices.h)
    auto [grad_input, grad_weight, grad_bias] = backward.call(
        grads[0], saved[2], saved[3], saved[0], saved[1], ints(ctx, "stride"), ints(ctx, "padding"),
        ints(ctx, "dilation"), ctx->saved_data["groups"].toInt(), ints(ctx, "pool_kernel_size"),
        ints(ctx, "pool_stride"), ints(ctx, "pool_padding"), ints(ctx, "pool_dilation"),
        ctx->saved_data["ceil_mode"].toBool(), mask);
    none[0] = mask[0] ? grad_input : at::Tensor();
    none[1] = mask[1] ? grad_weight : at::Tensor();
    none[2] = mask[2] ? grad_bias : at::Tensor();
    return none;
  }
};

std::tuple<at::Tensor, at::Tensor> conv2d_maxpool_relu_autograd(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride, c10::IntArrayRef pool_padding,
    c10::IntArrayRef pool_dilation, bool ceil_mode) {
  auto outputs = Conv2dMaxPoolRelu::apply(input, weight, bias, stride, padding, dilation, groups, pool_kernel_size,
                                          pool_stride, pool_padding, pool_dilation, ceil_mode);
  return {outputs[0], outputs[1]};
}

// ---------------------------------------------------------------------------------------------------------------
// batch_norm: (output, mean, var); batch_norm_relu: (output, mean, var, kept). The statistics and the mask are
// not differentiable (as torch's batch norm's saved statistics).
// ---------------------------------------------------------------------------------------------------------------

using BatchNormForward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
    const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, bool, double);
using BatchNormReluForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
    const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, bool, double);

// What the batch norms' backwards share: the arguments saved besides tensors, the gradients wanted (input, weight
// where there is one, bias where there is one), and the gradients returned for a Function of `inputs` arguments.
void save_batch_norm_args(AutogradContext* ctx, const c10::optional<at::Tensor>& bias, bool training, double eps) {
  ctx->saved_data["has_bias"] = bias.has_value();
  ctx->saved_data["training"] = training;
  ctx->saved_data["eps"] = eps;
}

std::array<bool, 3> batch_norm_grad_mask(AutogradContext* ctx, const at::Tensor& saved_weight) {
  return {ctx->needs_input_grad(0), saved_weight.defined() && ctx->needs_input_grad(1),
          ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)};
}

variable_list batch_norm_grads(std::array<bool, 3> mask,
                               const std::tuple<at::Tensor, at::Tensor, at::Tensor>& grads, size_t inputs) {
  variable_list out(inputs);
  out[0] = mask[0] ? std::get<0>(grads) : at::Tensor();
  out[1] = mask[1] ? std::get<1>(grads) : at::Tensor();
  out[2] = mask[2] ? std::get<2>(grads) : at::Tensor();
  return out;
}

c10::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

template <bool kRelu>
struct BatchNorm : public torch::autograd::Function<BatchNorm<kRelu>> {
  static constexpr const char* kName = kRelu ? "cnn_ext.batch_norm_relu" : "cnn_ext.batch_norm";

  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
                               const c10::optional<at::Tensor>& running_var, bool training, double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    variable_list outputs;
    if constexpr (kRelu) {
      static auto batch_norm_relu = op<BatchNormReluForward>("cnn_ext::batch_norm_relu");
      auto [output, mean, var, kept] =
          batch_norm_relu.call(input, weight, bias, running_mean, running_var, training, eps);
      outputs = {output, mean, var, kept};
    } else {
      static auto batch_norm = op<BatchNormForward>("cnn_ext::batch_norm");
      auto [output, mean, var] = batch_norm.call(input, weight, bias, running_mean, running_var, training, eps);
      outputs = {output, mean, var};
    }
    ctx->mark_non_differentiable(variable_list(outputs.begin() + 1, outputs.end()));
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), outputs[1], outputs[2],
                            kRelu ? outputs[3] : at::Tensor()});
    save_batch_norm_args(ctx, bias, training, eps);
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 3> mask = batch_norm_grad_mask(ctx, saved[1]);
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2])) return variable_list(7);
    refuse_double_backward(kName);
    static auto backward = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
        bool, double, std::array<bool, 3>, const c10::optional<at::Tensor>&)>("cnn_ext::batch_norm_backward");
    return batch_norm_grads(mask,
                            backward.call(grads[0], saved[0], defined_or_none(saved[1]), saved[2], saved[3],
                                          ctx->saved_data["training"].toBool(), ctx->saved_data["eps"].toDouble(),
                                          mask, defined_or_none(saved[4])),
                            7);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_autograd(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, bool training,
    double eps) {
  auto outputs = BatchNorm<false>::apply(input, weight, bias, running_mean, running_var, training, eps);
  return {outputs[0], outputs[1], outputs[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_autograd(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, bool training,
    double eps) {
  auto outputs = BatchNorm<true>::apply(input, weight, bias, running_mean, running_var, training, eps);
  return {outputs[0], outputs[1], outputs[2], outputs[3]};
}

// ---------------------------------------------------------------------------------------------------------------
// batch_norm_relu_max_pool2d: (output, mean, var, indices); the statistics and indices are not differentiable.
// ---------------------------------------------------------------------------------------------------------------

struct BatchNormReluMaxPool : public torch::autograd::Function<BatchNormReluMaxPool> {
  static constexpr const char* kName = "cnn_ext.batch_norm_relu_max_pool2d";

  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
                               const c10::optional<at::Tensor>& running_var, bool training, double eps,
                               c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
                               c10::IntArrayRef dilation, bool ceil_mode) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static auto forward_op = op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
        const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, bool, double, c10::IntArrayRef,
        c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, bool)>("cnn_ext::batch_norm_relu_max_pool2d");
    auto [output, mean, var, indices] = forward_op.call(input, weight, bias, running_mean, running_var, training, eps,
                                                        kernel_size, stride, padding, dilation, ceil_mode);
    ctx->mark_non_differentiable({mean, var, indices});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), mean, var, output, indices});
    save_batch_norm_args(ctx, bias, training, eps);
    return {output, mean, var, indices};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 3> mask = batch_norm_grad_mask(ctx, saved[1]);
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2])) return variable_list(12);
    refuse_double_backward(kName);
    static auto backward = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
        const at::Tensor&, const at::Tensor&, bool, double, std::array<bool, 3>)>(
        "cnn_ext::batch_norm_relu_max_pool2d_backward");
    return batch_norm_grads(mask,
                            backward.call(grads[0], saved[4], saved[5], saved[0], defined_or_none(saved[1]),
                                          saved[2], saved[3], ctx->saved_data["training"].toBool(),
                                          ctx->saved_data["eps"].toDouble(), mask),
                            12);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_max_pool2d_autograd(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, bool training,
    double eps, c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, bool ceil_mode) {
  auto outputs = BatchNormReluMaxPool::apply(input, weight, bias, running_mean, running_var, training, eps,
                                             kernel_size, stride, padding, dilation, ceil_mode);
  return {outputs[0], outputs[1], outputs[2], outputs[3]};
}

// ---------------------------------------------------------------------------------------------------------------
// dropout: (output, kept); the mask is not differentiable.
// ---------------------------------------------------------------------------------------------------------------

struct Dropout : public torch::autograd::Function<Dropout> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, double p, int64_t seed) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static auto dropout =
        op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, double, int64_t)>("cnn_ext::dropout");
    auto [output, kept] = dropout.call(input, p, seed);
    ctx->mark_non_differentiable({kept});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({kept});
    ctx->saved_data["p"] = p;
    return {output, kept};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    refuse_double_backward("cnn_ext.dropout");
    static auto backward =
        op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("cnn_ext::dropout_backward");
    return {backward.call(grads[0], ctx->get_saved_variables()[0], ctx->saved_data["p"].toDouble()), at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> dropout_autograd(const at::Tensor& input, double p, int64_t seed) {
  auto outputs = Dropout::apply(input, p, seed);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(cnn_ext, Autograd, m) {
  m.impl("conv2d", &conv2d_autograd);
  m.impl("max_pool2d", &max_pool2d_autograd);
  m.impl("avg_pool2d", &avg_pool2d_autograd);
  m.impl("conv2d_maxpool_relu", &conv2d_maxpool_relu_autograd);
  m.impl("batch_norm", &batch_norm_autograd);
  m.impl("batch_norm_relu", &batch_norm_relu_autograd);
  m.impl("batch_norm_relu_max_pool2d", &batch_norm_relu_max_pool2d_autograd);
  m.impl("dropout", &dropout_autograd);
}

}  // namespace cnn_ext
