"""float16 and bfloat16 on the CUDA kernels (on a GPU, and on the CPU through the emulator): every result against a
float64 reference, element by element, within the accumulation-aware bound of _support.accumulation_bound (float32
accumulation, one rounding to the format). The bound is tight enough that a kernel accumulating in half precision
fails it: the last test shows that on a simulated one."""

import pytest
import torch
import torch.nn.functional as F

import cnn_ext
from _support import CUDA_KERNEL_DEVICES, UNIT_ROUNDOFF, accumulation_bound, assert_within_bound, grads

ops = torch.ops.cnn_ext
LOW = [torch.float16, torch.bfloat16]
LOW_IDS = ["f16", "bf16"]

CONV_CONFIGS = [
    dict(shape=(4, 8, 17, 15), weight=(12, 8, 3, 3), stride=1, padding=1, dilation=1, groups=1),
    dict(shape=(3, 6, 20, 20), weight=(6, 3, 5, 3), stride=2, padding=(2, 1), dilation=(1, 2), groups=2),
    dict(shape=(2, 16, 14, 14), weight=(16, 1, 3, 3), stride=1, padding=1, dilation=1, groups=16),  # direct kernels
    dict(shape=(16, 1, 28, 28), weight=(10, 1, 5, 5), stride=1, padding=0, dilation=1, groups=1),   # C == 1
    dict(shape=(1, 64, 8, 8), weight=(64, 64, 3, 3), stride=1, padding=1, dilation=1, groups=1),    # split-K fprop
    dict(shape=(4, 64, 28, 28), weight=(64, 64, 3, 3), stride=1, padding=1, dilation=1, groups=1),
]


def _config_id(cfg):
    return "x{}_w{}_g{}".format("x".join(map(str, cfg["shape"])), "x".join(map(str, cfg["weight"])), cfg["groups"])


def _low_precision(shape, dtype, device, generator):
    return torch.randn(shape, generator=generator).to(dtype).to(device).requires_grad_()


def _conv_references(x, w, b, grad_out, args):
    """float64 results of conv2d and its three gradients for the (rounded) inputs, and each one's Σ|a·b|."""
    x64, w64, b64 = (t.detach().double().cpu().requires_grad_() for t in (x, w, b))
    g64 = grad_out.double().cpu()
    out = F.conv2d(x64, w64, b64, **args)
    exact = [out.detach()] + list(torch.autograd.grad(out, [x64, w64, b64], g64))
    xa, wa = x64.detach().abs().requires_grad_(), w64.detach().abs().requires_grad_()
    magnitude_out = F.conv2d(xa, wa, b64.detach().abs(), **args)
    magnitudes = [magnitude_out.detach()] + list(torch.autograd.grad(magnitude_out, [xa, wa], g64.abs()))
    magnitudes.append(g64.abs().sum((0, 2, 3)))
    return exact, magnitudes


@pytest.mark.parametrize("device", CUDA_KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=_config_id)
def test_conv2d_within_accumulation_bound(cfg, dtype, device):
    g = torch.Generator().manual_seed(0)
    x, w = _low_precision(cfg["shape"], dtype, device, g), _low_precision(cfg["weight"], dtype, device, g)
    b = _low_precision((cfg["weight"][0],), dtype, device, g)
    args = {k: cfg[k] for k in ("stride", "padding", "dilation", "groups")}
    out = cnn_ext.functional.conv2d(x, w, b, **args)
    grad_out = torch.randn(out.shape, generator=g).to(dtype)
    results = [out] + grads(out, [x, w, b], grad_out.to(device))
    exact, magnitudes = _conv_references(x, w, b, grad_out, args)
    n, _, p, q = out.shape
    k, c_per_group, r, s = cfg["weight"]
    terms = [c_per_group * r * s + 1, k // cfg["groups"] * r * s, n * p * q, n * p * q]
    for name, got, want, magnitude, count in zip(("output", "grad_input", "grad_weight", "grad_bias"), results,
                                                 exact, magnitudes, terms):
        assert got.dtype == dtype and got.shape == want.shape
        assert_within_bound(got, want, accumulation_bound(magnitude, want, count, dtype), name)


@pytest.mark.parametrize("device", CUDA_KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("shape", [(16, 1, 28, 28, 10), (16, 10, 12, 12, 20), (2, 460, 6, 6, 3)],
                         ids=["mnist_c1", "mnist_c2", "weights_in_global_memory"])
def test_fused_within_accumulation_bound(shape, dtype, device):
    """The fused conv + max-pool + ReLU: each pooled output is within the largest bound of the convolution values
    in its window (max and ReLU are 1-Lipschitz); its gradients, given the forward's own indices, within theirs."""
    n, c, hw, _, k = shape
    g = torch.Generator().manual_seed(1)
    x, w = _low_precision((n, c, hw, hw), dtype, device, g), _low_precision((k, c, 3, 3), dtype, device, g)
    b = _low_precision((k,), dtype, device, g)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    pool = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    out, idx = ops.conv2d_maxpool_relu(x, w, b, *conv, *pool)
    conv64 = F.conv2d(*(t.detach().double().cpu() for t in (x, w, b)), padding=1)
    magnitude = F.conv2d(*(t.detach().double().cpu().abs() for t in (x, w, b)), padding=1)
    conv_bound = accumulation_bound(magnitude, conv64, c * 9 + 1, dtype)
    want = torch.relu(F.max_pool2d(conv64, 2))
    assert_within_bound(out, want, F.max_pool2d(conv_bound, 2), "fused output")

    grad_out = torch.randn(out.shape, generator=g).to(dtype)
    grad_x, grad_w, grad_b = ops.conv2d_maxpool_relu_backward(grad_out.to(device), out, idx, x.detach(), w.detach(),
                                                              *conv, *pool, [True, True, True])
    # The gradient reaching the convolution output, exact: the unpooled, ReLU-masked grad_out at our indices.
    grad_conv = torch.ops.aten.max_pool2d_with_indices_backward(
        torch.where(out.detach().double().cpu() > 0, grad_out.double(), 0.0), conv64, *pool[:4], False,
        idx.cpu())
    exact, magnitudes = _conv_references(x, w, b, grad_conv, dict(padding=1))
    terms = [k * 9, n * hw * hw, n * hw * hw]
    for name, got, want, mag, count in zip(("grad_input", "grad_weight", "grad_bias"), (grad_x, grad_w, grad_b),
                                           exact[1:], magnitudes[1:], terms):
        assert_within_bound(got, want, accumulation_bound(mag, want, count, dtype), f"fused {name}")


@pytest.mark.parametrize("device", CUDA_KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_pooling_low_precision(dtype, device):
    """Max pooling is exact in any format (outputs, indices, gradients equal torch's); average pooling is within
    its bound: forward sums the window in float32 and divides; backward divides each gradient in the format (as
    torch does) and sums those in float32."""
    g = torch.Generator().manual_seed(2)
    x = _low_precision((4, 6, 15, 13), dtype, device, g)
    out, idx = cnn_ext.functional.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
    ref, ref_idx = F.max_pool2d(x.detach().double().cpu(), 3, 2, 1, ceil_mode=True, return_indices=True)
    assert torch.equal(out.double().cpu(), ref) and torch.equal(idx.cpu(), ref_idx)
    grad_out = torch.randn(out.shape, generator=g).to(dtype)
    (got,) = grads(out, [x], grad_out.to(device))
    x64 = x.detach().double().cpu().requires_grad_()
    (want,) = torch.autograd.grad(F.max_pool2d(x64, 3, 2, 1, ceil_mode=True), x64, grad_out.double())
    window_bound = UNIT_ROUNDOFF[dtype] * want.abs()  # one rounding where overlapping windows add up
    assert_within_bound(got, want, window_bound, "max_pool2d grad_input")

    args = dict(kernel_size=3, stride=2, padding=1, count_include_pad=False)
    avg = cnn_ext.functional.avg_pool2d(x, **args)
    avg64 = F.avg_pool2d(x64.detach(), **args)
    magnitude = F.avg_pool2d(x64.detach().abs(), **args)
    assert_within_bound(avg, avg64, accumulation_bound(magnitude, avg64, 9 + 1, dtype), "avg_pool2d output")
    grad_out = torch.randn(avg.shape, generator=g).to(dtype)
    (got,) = grads(avg, [x], grad_out.to(device))
    x64 = x64.detach().requires_grad_()
    (want,) = torch.autograd.grad(F.avg_pool2d(x64, **args), x64, grad_out.double())
    (magnitude,) = torch.autograd.grad(F.avg_pool2d(x64, **args), x64, grad_out.double().abs())
    # Each term is rounded to the format before it is summed: u·Σ|term| on top of the summation bound.
    bound = accumulation_bound(magnitude, want, 9, dtype) + UNIT_ROUNDOFF[dtype] * magnitude
    assert_within_bound(got, want, bound, "avg_pool2d grad_input")


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_bound_rejects_half_precision_accumulation(dtype):
    """The bound's own check, on the CPU: a convolution of `dtype` inputs summed in float32 and rounded once passes
    it; the same sums kept in `dtype` after every addition (what a kernel accumulating in half precision computes)
    fail it."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, 10, 10, generator=g).to(dtype).double()
    w = torch.randn(16, 32, 3, 3, generator=g).to(dtype).double()
    exact = F.conv2d(x, w, padding=1)
    bound = accumulation_bound(F.conv2d(x.abs(), w.abs(), padding=1), exact, 32 * 9, dtype)
    products = F.unfold(x, 3, padding=1).unsqueeze(1) * w.reshape(1, 16, -1, 1)  # [n, k, c·r·s, p·q], exact
    in_float32 = products.float().sum(2).to(dtype).double().reshape(exact.shape)
    assert_within_bound(in_float32, exact, bound, "float32 accumulation")
    partial = torch.zeros(products[:, :, 0].shape, dtype=dtype)
    for term in products.unbind(2):
        partial = (partial.double() + term).to(dtype)
    in_half = partial.double().reshape(exact.shape)
    with pytest.raises(AssertionError, match="exceed their accumulation bound"):
        assert_within_bound(in_half, exact, bound, "accumulation in the format itself")
