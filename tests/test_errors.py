"""Bad input raises a Python exception whose message names the offending argument — never a crash or garbage."""

import pytest
import torch

import cnn_ext
from _support import DEVICES, needs_gpu

fn = cnn_ext.functional
ops = torch.ops.cnn_ext


def _x(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, device=device).to(dtype)


# (description, callable, expected exception type, words the message must contain)
def _conv_cases(device):
    x, w = _x(2, 4, 8, 8, device=device), _x(6, 4, 3, 3, device=device)
    return [
        ("input rank 2", lambda: fn.conv2d(_x(8, 8, device=device), w), ValueError, "input"),
        ("input rank 5", lambda: fn.conv2d(_x(1, 2, 4, 8, 8, device=device), w), ValueError, "input"),
        ("weight rank 3", lambda: fn.conv2d(x, _x(6, 4, 3, device=device)), ValueError, "weight"),
        ("channel mismatch", lambda: fn.conv2d(x, _x(6, 3, 3, 3, device=device)), ValueError, "input channels"),
        ("groups do not divide C", lambda: fn.conv2d(_x(2, 5, 8, 8, device=device), _x(6, 2, 3, 3, device=device),
                                                     groups=2), ValueError, "groups"),
        ("groups do not divide K", lambda: fn.conv2d(x, _x(5, 2, 3, 3, device=device), groups=2), ValueError,
         "groups"),
        ("groups zero", lambda: fn.conv2d(x, w, groups=0), ValueError, "groups"),
        ("kernel larger than padded input", lambda: fn.conv2d(_x(1, 4, 2, 8, device=device), w), ValueError,
         "kernel_size"),
        ("dilated kernel too large", lambda: fn.conv2d(x, w, dilation=4), ValueError, "dilation"),
        ("stride zero", lambda: fn.conv2d(x, w, stride=0), ValueError, "stride"),
        ("stride negative", lambda: fn.conv2d(x, w, stride=(1, -2)), ValueError, "stride"),
        ("dilation zero", lambda: fn.conv2d(x, w, dilation=0), ValueError, "dilation"),
        ("negative padding", lambda: fn.conv2d(x, w, padding=-1), ValueError, "padding"),
        ("padding string", lambda: fn.conv2d(x, w, padding="full"), ValueError, "padding"),
        ("same with stride", lambda: fn.conv2d(x, w, stride=2, padding="same"), ValueError, "stride"),
        ("stride with three elements", lambda: fn.conv2d(x, w, stride=(1, 1, 1)), ValueError, "stride"),
        ("stride float", lambda: fn.conv2d(x, w, stride=1.5), TypeError, "stride"),
        ("bias size", lambda: fn.conv2d(x, w, _x(5, device=device)), ValueError, "bias"),
        ("bias rank", lambda: fn.conv2d(x, w, _x(6, 1, device=device)), ValueError, "bias"),
        ("dtype mismatch", lambda: fn.conv2d(x, w.double()), TypeError, "weight"),
        ("bias dtype mismatch", lambda: fn.conv2d(x, w, _x(6, device=device).double()), TypeError, "bias"),
        ("integer input", lambda: fn.conv2d(x.long(), w.long()), TypeError, "input"),
        ("input not a tensor", lambda: fn.conv2d([[1.0]], w), TypeError, "input"),
        ("devices differ", lambda: fn.conv2d(x, w.to("meta")), ValueError, "device"),
        ("backward input: grad_output shape", lambda: ops.conv2d_backward_input(
            _x(2, 6, 5, 5, device=device), w, [2, 4, 8, 8], [1, 1], [0, 0], [1, 1], 1), ValueError, "grad_output"),
        ("backward input: input_size rank", lambda: ops.conv2d_backward_input(
            _x(2, 6, 6, 6, device=device), w, [2, 4, 8], [1, 1], [0, 0], [1, 1], 1), ValueError, "input size"),
        ("backward weight: grad_output shape", lambda: ops.conv2d_backward_weight(
            _x(2, 6, 5, 5, device=device), x, [6, 4, 3, 3], [1, 1], [0, 0], [1, 1], 1), ValueError, "grad_output"),
        ("backward bias: rank", lambda: ops.conv2d_backward_bias(_x(6, 5, device=device)), ValueError,
         "grad_output"),
    ]


def _pool_cases(device):
    x = _x(2, 3, 8, 8, device=device)
    out, idx = fn.max_pool2d(x, 2, return_indices=True)
    return [
        ("max: input rank 2", lambda: fn.max_pool2d(_x(8, 8, device=device), 2), ValueError, "input"),
        ("max: kernel zero", lambda: fn.max_pool2d(x, 0), ValueError, "kernel_size"),
        ("max: stride zero", lambda: fn.max_pool2d(x, 2, stride=0), ValueError, "stride"),
        ("max: dilation zero", lambda: fn.max_pool2d(x, 2, dilation=0), ValueError, "dilation"),
        ("max: negative padding", lambda: fn.max_pool2d(x, 3, padding=-1), ValueError, "padding"),
        ("max: padding over half kernel", lambda: fn.max_pool2d(x, 3, padding=2), ValueError, "padding"),
        ("max: kernel larger than input", lambda: fn.max_pool2d(_x(1, 1, 2, 2, device=device), 3), ValueError,
         "kernel_size"),
        ("max: integer input", lambda: fn.max_pool2d(x.long(), 2), TypeError, "input"),
        ("max: zero-width input", lambda: fn.max_pool2d(_x(1, 1, 4, 0, device=device), 1), ValueError, "input"),
        ("max backward: indices dtype", lambda: ops.max_pool2d_backward(
            out, idx.int(), [2, 3, 8, 8], [2, 2], [2, 2], [0, 0], [1, 1], False), TypeError, "indices"),
        ("max backward: indices shape", lambda: ops.max_pool2d_backward(
            out, idx[:1], [2, 3, 8, 8], [2, 2], [2, 2], [0, 0], [1, 1], False), ValueError, "indices"),
        ("max backward: index out of range", lambda: ops.max_pool2d_backward(
            out, torch.full_like(idx, 64), [2, 3, 8, 8], [2, 2], [2, 2], [0, 0], [1, 1], False), ValueError,
         "indices"),
        ("avg: kernel zero", lambda: fn.avg_pool2d(x, (2, 0)), ValueError, "kernel_size"),
        ("avg: padding over half kernel", lambda: fn.avg_pool2d(x, 2, padding=2), ValueError, "padding"),
        ("avg: divisor_override zero", lambda: fn.avg_pool2d(x, 2, divisor_override=0), ValueError,
         "divisor_override"),
        ("avg: divisor_override float", lambda: fn.avg_pool2d(x, 2, divisor_override=1.5), TypeError,
         "divisor_override"),
        ("avg: integer input", lambda: fn.avg_pool2d(x.int(), 2), TypeError, "input"),
        ("avg backward: grad_output shape", lambda: ops.avg_pool2d_backward(
            _x(2, 3, 3, 3, device=device), [2, 3, 8, 8], [2, 2], [2, 2], [0, 0], False, True, None), ValueError,
         "grad_output"),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(28))
def test_conv2d_bad_input(index, device):
    name, call, exc, words = _conv_cases(device)[index]
    with pytest.raises(exc, match=words):
        call()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(18))
def test_pool_bad_input(index, device):
    name, call, exc, words = _pool_cases(device)[index]
    with pytest.raises(exc, match=words):
        call()


def test_case_counts_match_lists():
    assert len(_conv_cases("cpu")) == 28 and len(_pool_cases("cpu")) == 18


def test_cpu_rejects_half_precision_naming_the_dtype():
    with pytest.raises(TypeError, match="input.*Half"):
        fn.conv2d(_x(1, 1, 4, 4, dtype=torch.half), _x(1, 1, 3, 3, dtype=torch.half))
    with pytest.raises(TypeError, match="input.*BFloat16"):
        fn.max_pool2d(_x(1, 1, 4, 4, dtype=torch.bfloat16), 2)


@needs_gpu
def test_cpu_and_cuda_tensors_mixed():
    x, w = _x(1, 2, 6, 6), _x(3, 2, 3, 3, device="cuda")
    with pytest.raises(ValueError, match="device"):
        fn.conv2d(x, w)
