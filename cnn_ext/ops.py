"""Autograd for the cnn_ext operators.

The operators themselves (schemas, CPU/CUDA kernels and Meta kernels for FakeTensor/torch.compile) are defined in
C++ (csrc/). Here each forward op gets its derivative, written in terms of the backward ops, so autograd,
torch.compile and torch.export all see our kernels. The backward ops are not themselves differentiable: double
backward is not supported.
"""

import torch

_ops = torch.ops.cnn_ext


def _conv2d_setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None
    ctx.args = (stride, padding, dilation, groups)


def _conv2d_grads(ctx, grad_output, input, weight, conv_args):
    """Gradients of a convolution's input, weight and bias (as far as ctx.needs_input_grad asks)."""
    grad_input = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_input = _ops.conv2d_backward_input(grad_output, weight, input.shape, *conv_args)
    if ctx.needs_input_grad[1]:
        grad_weight = _ops.conv2d_backward_weight(grad_output, input, weight.shape, *conv_args)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = _ops.conv2d_backward_bias(grad_output)
    return grad_input, grad_weight, grad_bias


def _conv2d_backward(ctx, grad_output):
    input, weight = ctx.saved_tensors
    return _conv2d_grads(ctx, grad_output, input, weight, ctx.args) + (None,) * 4


torch.library.register_autograd("cnn_ext::conv2d", _conv2d_backward, setup_context=_conv2d_setup_context)


def _max_pool2d_setup_context(ctx, inputs, output):
    input, kernel_size, stride, padding, dilation, ceil_mode = inputs
    _, indices = output
    ctx.mark_non_differentiable(indices)
    ctx.set_materialize_grads(False)  # the indices' gradient is never used: don't allocate zeros for it
    ctx.save_for_backward(indices)
    ctx.input_shape = input.shape
    ctx.args = (kernel_size, stride, padding, dilation, ceil_mode)


def _max_pool2d_backward(ctx, grad_output, _grad_indices):
    if grad_output is None:
        return (None,) * 6
    (indices,) = ctx.saved_tensors
    grad_input = _ops.max_pool2d_backward(grad_output, indices, ctx.input_shape, *ctx.args)
    return grad_input, None, None, None, None, None


torch.library.register_autograd("cnn_ext::max_pool2d", _max_pool2d_backward, setup_context=_max_pool2d_setup_context)


def _avg_pool2d_setup_context(ctx, inputs, output):
    input, *args = inputs
    ctx.input_shape = input.shape
    ctx.args = args


def _avg_pool2d_backward(ctx, grad_output):
    grad_input = _ops.avg_pool2d_backward(grad_output, ctx.input_shape, *ctx.args)
    return (grad_input,) + (None,) * len(ctx.args)


torch.library.register_autograd("cnn_ext::avg_pool2d", _avg_pool2d_backward, setup_context=_avg_pool2d_setup_context)


def _conv2d_maxpool_relu_setup_context(ctx, inputs, output):
    input, weight, bias, *args = inputs
    out, indices = output
    ctx.mark_non_differentiable(indices)
    ctx.set_materialize_grads(False)  # the indices' gradient is never used: don't allocate zeros for it
    ctx.save_for_backward(input, weight, out, indices)
    ctx.has_bias = bias is not None
    ctx.args = args  # stride, padding, dilation, groups, then the pooling arguments


def _conv2d_maxpool_relu_backward(ctx, grad_output, _grad_indices):
    no_grads = (None, None, None) + (None,) * len(ctx.args)
    if grad_output is None:
        return no_grads
    input, weight, out, indices = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    if not any(mask):
        return no_grads
    grads = _ops.conv2d_maxpool_relu_backward(grad_output, out, indices, input, weight, *ctx.args, mask)
    return tuple(g if wanted else None for g, wanted in zip(grads, mask)) + no_grads[3:]


torch.library.register_autograd("cnn_ext::conv2d_maxpool_relu", _conv2d_maxpool_relu_backward,
                                setup_context=_conv2d_maxpool_relu_setup_context)


def _eager(name, setup_context, backward):
    """torch.ops.cnn_ext.<name> with autograd, for eager calls from cnn_ext.functional: through an autograd.Function
    with the registered formula (the same setup_context and backward) when autograd records the call, else the op
    itself, whose registered autograd serves torch.compile, torch.export and direct calls. The Function skips
    register_autograd's per-call argument handling: torch._library fills in the schema's defaults on every call,
    about 13 µs for conv2d's 7 arguments and 40 µs for the fused op's 12, as much as a small layer's kernels."""
    op = getattr(_ops, name)

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            with torch._C._AutoDispatchBelowAutograd():
                result = op(*args)
            setup_context(ctx, args, result)
            return result

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    Function.__name__ = Function.__qualname__ = f"{name}_eager"

    def call(*args):
        if (torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args)):
            return Function.apply(*args)
        return op(*args)

    call.__name__ = name
    return call


conv2d = _eager("conv2d", _conv2d_setup_context, _conv2d_backward)
max_pool2d = _eager("max_pool2d", _max_pool2d_setup_context, _max_pool2d_backward)
avg_pool2d = _eager("avg_pool2d", _avg_pool2d_setup_context, _avg_pool2d_backward)
conv2d_maxpool_relu = _eager("conv2d_maxpool_relu", _conv2d_maxpool_relu_setup_context,
                             _conv2d_maxpool_relu_backward)
