"""Operator registration checks: torch.library.opcheck (schema, fake/meta kernels, autograd registration,
AOT dispatch with dynamic shapes) for every op, torch.autograd.gradcheck for every differentiable op, and the eager
autograd path of cnn_ext.functional against the registered one."""

import pytest
import torch

import cnn_ext
from _support import DEVICES

ops = torch.ops.cnn_ext


def _t(*shape, device, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(shape, dtype=torch.float64, generator=g).to(device).requires_grad_(requires_grad)


def _samples(device):
    """(op, args) pairs covering every operator, with and without optional arguments."""
    x = _t(2, 4, 9, 8, device=device, requires_grad=True)
    w = _t(6, 2, 3, 2, device=device, requires_grad=True)
    b = _t(6, device=device, requires_grad=True)
    conv = ([2, 1], [1, 0], [1, 2], 2)  # stride, padding, dilation, groups
    out_shape = ops.conv2d(x, w, b, *conv).shape
    gy = _t(*out_shape, device=device)
    pool_x = _t(2, 3, 9, 7, device=device, requires_grad=True)
    pool = ([3, 2], [2, 1], [1, 1], [1, 2], True)  # kernel, stride, padding, dilation, ceil_mode
    pooled, indices = ops.max_pool2d(pool_x, *pool)
    avg = ([3, 3], [2, 2], [1, 1], True, False, None)
    avg_out = ops.avg_pool2d(pool_x, *avg)
    return [
        (ops.conv2d, (x, w, b, *conv)),
        (ops.conv2d, (x, w, None, *conv)),
        (ops.conv2d_backward_input, (gy, w.detach(), list(x.shape), *conv)),
        (ops.conv2d_backward_weight, (gy, x.detach(), list(w.shape), *conv)),
        (ops.conv2d_backward_bias, (gy,)),
        (ops.max_pool2d, (pool_x, *pool)),
        (ops.max_pool2d_backward, (_t(*pooled.shape, device=device), indices, list(pool_x.shape), *pool)),
        (ops.avg_pool2d, (pool_x, *avg)),
        (ops.avg_pool2d, (pool_x, [2, 2], [2, 2], [0, 0], False, True, 3)),
        (ops.avg_pool2d_backward, (_t(*avg_out.shape, device=device), list(pool_x.shape), *avg)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(10))
def test_opcheck(index, device):
    op, args = _samples(device)[index]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_conv2d(device):
    x = _t(2, 4, 7, 6, device=device, requires_grad=True)
    w = _t(6, 2, 3, 2, device=device, requires_grad=True)
    b = _t(6, device=device, requires_grad=True)
    for kwargs in (dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2), dict(padding="same", groups=2)):
        assert torch.autograd.gradcheck(lambda x, w, b: cnn_ext.functional.conv2d(x, w, b, **kwargs), (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_max_pool2d(device):
    x = _t(2, 3, 7, 6, device=device, requires_grad=True)  # distinct random values: no ties to perturb across
    assert torch.autograd.gradcheck(
        lambda x: cnn_ext.functional.max_pool2d(x, (3, 2), stride=2, padding=1, dilation=(1, 2), ceil_mode=True),
        (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_avg_pool2d(device):
    x = _t(2, 3, 7, 6, device=device, requires_grad=True)
    for kwargs in (dict(ceil_mode=True, count_include_pad=False), dict(divisor_override=2)):
        assert torch.autograd.gradcheck(
            lambda x: cnn_ext.functional.avg_pool2d(x, 3, stride=2, padding=1, **kwargs), (x,))


_EAGER_CASES = {
    "conv2d": (lambda x, w, b: cnn_ext.functional.conv2d(x, w, b, stride=(2, 1), padding=1, dilation=(1, 2)),
               lambda x, w, b: ops.conv2d(x, w, b, [2, 1], [1, 1], [1, 2], 1)),
    "max_pool2d": (lambda x, w, b: cnn_ext.functional.max_pool2d(x, 3, 2, 1, ceil_mode=True),
                   lambda x, w, b: ops.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], True)[0]),
    "avg_pool2d": (lambda x, w, b: cnn_ext.functional.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
                   lambda x, w, b: ops.avg_pool2d(x, [3, 3], [2, 2], [1, 1], False, False, None)),
    "conv2d_maxpool_relu": (
        lambda x, w, b: cnn_ext.functional.conv2d_maxpool_relu(x, w, b, padding=1, pool_kernel_size=2),
        lambda x, w, b: ops.conv2d_maxpool_relu(x, w, b, [1, 1], [1, 1], [1, 1], 1, [2, 2], [2, 2], [0, 0], [1, 1],
                                                False)[0]),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(_EAGER_CASES))
def test_functional_equals_direct_op_calls(name, device):
    """cnn_ext.functional and a direct torch.ops.cnn_ext call take the same C++ autograd (csrc/autograd.cpp): the
    same bits, forward and backward, including the batch-in-lanes sizes."""
    eager_fn, registered_fn = _EAGER_CASES[name]
    g = torch.Generator().manual_seed(11)
    x = torch.randn(20, 3, 14, 14, generator=g).to(device).requires_grad_(True)
    w = torch.randn(8, 3, 3, 3, generator=g).to(device).requires_grad_(True)
    b = torch.randn(8, generator=g).to(device).requires_grad_(True)
    eager, registered = eager_fn(x, w, b), registered_fn(x, w, b)
    assert type(eager.grad_fn).__name__ == "CppFunction" and torch.equal(eager, registered)
    inputs = (x, w, b) if name.startswith("conv") else (x,)
    grad_output = torch.randn(eager.shape, generator=g).to(device)
    for a, b_ in zip(torch.autograd.grad(eager, inputs, grad_output),
                     torch.autograd.grad(registered, inputs, grad_output)):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("name", list(_EAGER_CASES))
def test_double_backward_raises_naming_the_op(name):
    """The backward ops have no derivatives: asking for a differentiable gradient is a clear error, not a silent
    first-order answer."""
    eager_fn, _ = _EAGER_CASES[name]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    out = eager_fn(x, w, b)
    with pytest.raises(RuntimeError, match=f"cnn_ext.{name}: double backward is not supported"):
        torch.autograd.grad(out.sum(), x, create_graph=True)
