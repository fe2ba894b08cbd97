"""Functional interface with torch.nn.functional's signatures, running on cnn_ext's kernels.

This layer only turns torch's flexible arguments (ints or pairs, 'same'/'valid', unbatched 3-D input, stride=None)
into the operators' explicit form; every check and all output-size math happen once, in the operators
(csrc/checks.h), for CPU and CUDA alike.
"""

from collections.abc import Sequence

import torch
import torch.fx
import torch.nn.functional as F

from . import ops

__all__ = ["conv2d", "max_pool2d", "avg_pool2d", "conv2d_maxpool_relu", "batch_norm", "batch_norm_relu",
           "batch_norm_relu_max_pool2d", "dropout"]


def _pair(value, name, op):
    """An int or a sequence of ints, as a list of two (a single-element sequence is repeated, as in torch)."""
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return [value, value]
    if isinstance(value, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        if len(value) == 1:
            return [value[0], value[0]]
        if len(value) == 2:
            return list(value)
        raise ValueError(f"{op}: {name} must have 1 or 2 elements, got {len(value)}: {tuple(value)}")
    raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")


def _check_tensor(value, name, op):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")


def _batched(input, op):
    """(input as 4-D, whether it was unbatched 3-D). Other ranks are rejected here with torch's wording."""
    _check_tensor(input, "input", op)
    if input.dim() == 3:
        return input.unsqueeze(0), True
    if input.dim() != 4:
        raise ValueError(
            f"{op}: input must be a 3-D (C, H, W) or 4-D (N, C, H, W) tensor, got a {input.dim()}-D tensor "
            f"of shape {tuple(input.shape)}"
        )
    return input, False


def _pool_stride(stride, kernel_size, op, name="stride"):
    """torch's pooling default: stride None (or empty) means stride = kernel_size."""
    if stride is None or (isinstance(stride, Sequence) and len(stride) == 0):
        return kernel_size
    return _pair(stride, name, op)


def _same_padding(input, weight, stride, dilation):
    """torch's padding='same': total padding dilation*(k-1) per side pair, the odd pixel on the bottom/right.
    Returns (possibly right/bottom-padded input, symmetric padding for the operator)."""
    if any(s != 1 for s in stride):
        raise ValueError("conv2d: padding='same' is not supported for strided convolutions (stride must be 1)")
    if weight.dim() != 4:
        raise ValueError(f"conv2d: weight must be a 4-D (K, C/groups, R, S) tensor, got {weight.dim()}-D")
    padding, extra = [], []
    for d, k in zip(dilation, weight.shape[2:]):
        total = d * (k - 1)
        padding.append(total // 2)
        extra.append(total - 2 * (total // 2))
    if any(extra):
        input = F.pad(input, (0, extra[1], 0, extra[0]))
    return input, padding


def _conv_args(input, weight, bias, stride, padding, dilation, groups, op):
    """torch's conv2d arguments in the operators' form: (4-D input, was it unbatched, stride, padding, dilation)."""
    input, unbatched = _batched(input, op)
    _check_tensor(weight, "weight", op)
    if bias is not None:
        _check_tensor(bias, "bias", op)
    stride = _pair(stride, "stride", op)
    dilation = _pair(dilation, "dilation", op)
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"{op}: groups must be an int, got {groups!r}")
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0, 0]
        elif padding == "same":
            input, padding = _same_padding(input, weight, stride, dilation)
        else:
            raise ValueError(f"{op}: padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")
    else:
        padding = _pair(padding, "padding", op)
    return input, unbatched, stride, padding, dilation


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution, as torch.nn.functional.conv2d."""
    input, unbatched, stride, padding, dilation = _conv_args(input, weight, bias, stride, padding, dilation, groups,
                                                             "conv2d")
    out = ops.conv2d(input, weight, bias, stride, padding, dilation, groups)
    return out.squeeze(0) if unbatched else out


def conv2d_maxpool_relu(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, pool_kernel_size=2,
                        pool_stride=None, pool_padding=0, pool_dilation=1, ceil_mode=False):
    """relu(max_pool2d(conv2d(input, weight, bias, ...), pool_kernel_size, ...)) as one fused operator: the
    convolution's output is pooled while it is computed, and never stored. Arguments as conv2d's and max_pool2d's
    (the pooling ones prefixed with pool_)."""
    op = "conv2d_maxpool_relu"
    input, unbatched, stride, padding, dilation = _conv_args(input, weight, bias, stride, padding, dilation, groups,
                                                             op)
    pool_kernel_size = _pair(pool_kernel_size, "pool_kernel_size", op)
    out, _ = ops.conv2d_maxpool_relu(input, weight, bias, stride, padding, dilation, groups, pool_kernel_size,
                                     _pool_stride(pool_stride, pool_kernel_size, op, "pool_stride"),
                                     _pair(pool_padding, "pool_padding", op),
                                     _pair(pool_dilation, "pool_dilation", op), bool(ceil_mode))
    return out.squeeze(0) if unbatched else out


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """2-D max pooling, as torch.nn.functional.max_pool2d (indices are h*W + w within each plane, int64)."""
    op = "max_pool2d"
    input, unbatched = _batched(input, op)
    kernel_size = _pair(kernel_size, "kernel_size", op)
    stride = _pool_stride(stride, kernel_size, op)
    out, indices = ops.max_pool2d(input, kernel_size, stride, _pair(padding, "padding", op),
                                  _pair(dilation, "dilation", op), bool(ceil_mode))
    if unbatched:
        out, indices = out.squeeze(0), indices.squeeze(0)
    return (out, indices) if return_indices else out


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """2-D average pooling, as torch.nn.functional.avg_pool2d."""
    op = "avg_pool2d"
    input, unbatched = _batched(input, op)
    kernel_size = _pair(kernel_size, "kernel_size", op)
    stride = _pool_stride(stride, kernel_size, op)
    if divisor_override is not None and (isinstance(divisor_override, bool) or not isinstance(divisor_override, int)):
        raise TypeError(f"{op}: divisor_override must be an int or None, got {divisor_override!r}")
    out = ops.avg_pool2d(input, kernel_size, stride, _pair(padding, "padding", op), bool(ceil_mode),
                         bool(count_include_pad), divisor_override)
    return out.squeeze(0) if unbatched else out


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """Batch normalisation over dim 1 of an (N, C, ...) input, as torch.nn.functional.batch_norm: by the batch's
    statistics when training (then running_mean and running_var, where given, move towards them by `momentum`, the
    variance unbiased), else by running_mean and running_var. float32 and float64 CPU tensors run on cnn_ext's
    kernel; other devices and dtypes on torch's (there is no CUDA kernel of ours yet)."""
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, "batch_norm")


def batch_norm_relu(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                    eps=1e-5):
    """relu(batch_norm(...)) as one operator, arguments as batch_norm's: the output is written once, and the
    backward reads a bool mask of the values ReLU kept instead of the output (ReLU's own backward pass is gone).
    float32 and float64 CPU tensors; other devices and dtypes run torch's batch norm and ReLU."""
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, "batch_norm_relu")


def batch_norm_relu_max_pool2d(input, running_mean, running_var, weight=None, bias=None, training=False,
                               momentum=0.1, eps=1e-5, kernel_size=2, stride=None, padding=0, dilation=1,
                               ceil_mode=False):
    """max_pool2d(relu(batch_norm(...)), kernel_size, ...) as one operator, arguments as batch_norm's and
    max_pool2d's: each plane is normalised into a buffer and pooled from there, so the full-size normalised output
    is never written, and the backward rebuilds the batch norm's gradient plane by plane from the pooled one. The
    same values as the three ops (bit for bit as cnn_ext's batch_norm_relu and max_pool2d). float32 and float64 CPU
    tensors (N, C, H, W); other devices and dtypes run torch's batch norm, ReLU and max pooling."""
    op = "batch_norm_relu_max_pool2d"
    _check_tensor(input, "input", op)
    kernel_size = _pair(kernel_size, "kernel_size", op)
    stride = _pool_stride(stride, kernel_size, op)
    padding, dilation = _pair(padding, "padding", op), _pair(dilation, "dilation", op)
    if input.device.type != "cpu" or input.dtype not in (torch.float32, torch.float64):
        out = F.relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps))
        return F.max_pool2d(out, kernel_size, stride, padding, dilation, ceil_mode)
    out, mean, var, _ = ops.batch_norm_relu_max_pool2d(input, weight, bias, running_mean, running_var,
                                                       bool(training), float(eps), kernel_size, stride, padding,
                                                       dilation, bool(ceil_mode))
    _update_running_stats(input, running_mean, running_var, training, momentum, mean, var)
    return out


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, op):
    """batch_norm or batch_norm_relu (op), then the running statistics' update."""
    _check_tensor(input, "input", op)
    relu = op == "batch_norm_relu"
    if input.device.type != "cpu" or input.dtype not in (torch.float32, torch.float64):
        out = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return F.relu(out) if relu else out
    args = (input, weight, bias, running_mean, running_var, bool(training), float(eps))
    out, mean, var = ops.batch_norm_relu(*args)[:3] if relu else ops.batch_norm(*args)
    _update_running_stats(input, running_mean, running_var, training, momentum, mean, var)
    return out


def _update_running_stats(input, running_mean, running_var, training, momentum, mean, var):
    """When training, running_mean and running_var (where given) move towards the batch's statistics by
    `momentum`, the variance unbiased, as torch's batch norm moves them."""
    count = input.numel() // max(1, input.shape[1])
    if training and count > 0:
        with torch.no_grad():
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            if running_var is not None:
                running_var.mul_(1 - momentum).add_(var, alpha=momentum * count / (count - 1))


def dropout(input, p=0.5, training=True, inplace=False, generator=None):
    """Dropout, as torch.nn.functional.dropout: when training, each value is kept with probability 1 - p and
    scaled by 1 / (1 - p), or zeroed; otherwise (or with p = 0) the input itself is returned. float32 and float64
    CPU tensors run on cnn_ext's kernel, whose random bits come from a counter-based generator seeded by one draw
    from `generator` (torch's default generator when None), so torch.manual_seed repeats them; they are not the bits
    torch's own dropout would draw. Other devices and dtypes, and inplace=True, run torch's dropout."""
    op = "dropout"
    _check_tensor(input, "input", op)
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{op}: p must be a number, got {p!r}")
    if not 0 <= p <= 1:
        raise ValueError(f"{op}: dropout probability p must be between 0 and 1, got {p}")
    if not training or p == 0:  # torch's dropout returns the input itself then
        return input
    if inplace or input.device.type != "cpu" or input.dtype not in (torch.float32, torch.float64):
        return F.dropout(input, p, training, inplace)
    seed = int(torch.randint(-2**63, 2**63 - 1, (), dtype=torch.int64, generator=generator))
    return ops.dropout(input, float(p), seed)[0]


# torch.fx records calls of these functions as calls (a symbolic trace cannot run their argument checks, which
# look at shapes), wherever they are called from: cnn_ext.convert traces models that use them.
for _name in __all__:
    torch.fx.wrap(_name)
del _name
