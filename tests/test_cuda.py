"""CUDA-only checks: CPU-vs-CUDA agreement, float16/bfloat16 parity, multi-GPU device guards and streams.
Skipped, with the reason, where no GPU (or no CUDA build) is present; the device-parametrised suites cover the rest
of the CUDA semantics."""

import pytest
import torch
import torch.nn.functional as F

import cnn_ext
from _support import TOLERANCES, cuda_kernels_available, grads

pytestmark = pytest.mark.skipif(not cuda_kernels_available(),
                                reason="no CUDA GPU visible or cnn_ext built without CUDA kernels")

CONV_CONFIGS = [
    dict(shape=(4, 8, 17, 15), weight=(12, 8, 3, 3), stride=1, padding=1, dilation=1, groups=1),
    dict(shape=(3, 6, 20, 20), weight=(6, 3, 5, 3), stride=2, padding=(2, 1), dilation=(1, 2), groups=2),
    dict(shape=(2, 16, 14, 14), weight=(16, 1, 3, 3), stride=1, padding=1, dilation=1, groups=16),
    dict(shape=(128, 1, 28, 28), weight=(10, 1, 5, 5), stride=1, padding=0, dilation=1, groups=1),
    dict(shape=(8, 64, 28, 28), weight=(64, 64, 3, 3), stride=1, padding=1, dilation=1, groups=1),
]


def _conv_all(fn, x, w, b, cfg, grad_out=None):
    out = fn(x, w, b, stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"])
    if grad_out is None:
        grad_out = torch.randn_like(out)
    return [out] + grads(out, [x, w, b], grad_out), grad_out


@pytest.mark.parametrize("cfg", CONV_CONFIGS)
def test_conv2d_cpu_and_cuda_agree(cfg):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg["shape"], generator=g, dtype=torch.float64)
    w = torch.randn(cfg["weight"], generator=g, dtype=torch.float64)
    b = torch.randn(cfg["weight"][0], generator=g, dtype=torch.float64)
    cpu, grad_out = _conv_all(cnn_ext.functional.conv2d, *(t.requires_grad_() for t in (x, w, b)), cfg)
    dev = [t.detach().cuda().requires_grad_() for t in (x, w, b)]
    cuda, _ = _conv_all(cnn_ext.functional.conv2d, *dev, cfg, grad_out.cuda())
    for a, c in zip(cpu, cuda):
        torch.testing.assert_close(c.cpu(), a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("cfg", CONV_CONFIGS)
def test_conv2d_low_precision_matches_float32_reference(cfg, dtype):
    """Low-precision inputs, float32 accumulation: compared with torch's float32 result on the same (rounded)
    inputs, to the tolerance of one rounding of the output (plus accumulation-order noise)."""
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=g).to(dtype).cuda().requires_grad_()
               for s in (cfg["shape"], cfg["weight"], (cfg["weight"][0],)))
    ours, grad_out = _conv_all(cnn_ext.functional.conv2d, x, w, b, cfg)
    ref32 = [t.detach().float().requires_grad_() for t in (x, w, b)]
    with torch.backends.cudnn.flags(allow_tf32=False):
        ref, _ = _conv_all(F.conv2d, *ref32, cfg, grad_out.float())
    fan_in = cfg["weight"][1] * cfg["weight"][2] * cfg["weight"][3]
    for name, got, want in zip(("out", "grad_input", "grad_weight", "grad_bias"), ours, ref):
        assert got.dtype == dtype
        scale = want.abs().max().item() + 1
        torch.testing.assert_close(got.float(), want, rtol=TOLERANCES[dtype]["rtol"],
                                   atol=TOLERANCES[dtype]["atol"] * scale, msg=f"{name} (fan-in {fan_in})")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "f32"])
def test_pooling_low_precision_matches_torch(dtype):
    x = torch.randn(4, 6, 15, 13, device="cuda").to(dtype).requires_grad_()
    out, idx = cnn_ext.functional.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
    ref, ref_idx = F.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
    assert torch.equal(out, ref) and torch.equal(idx, ref_idx)  # max is exact in any precision
    grad_out = torch.randn_like(out)
    assert torch.equal(grads(out, [x], grad_out)[0], grads(ref, [x], grad_out)[0])
    avg = cnn_ext.functional.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
    avg_ref = F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(avg, avg_ref, **tol)
    grad_out = torch.randn_like(avg)
    torch.testing.assert_close(grads(avg, [x], grad_out)[0], grads(avg_ref, [x], grad_out)[0], **tol)


def test_kernels_run_on_the_current_stream():
    x = torch.randn(8, 4, 16, 16, device="cuda")
    w = torch.randn(8, 4, 3, 3, device="cuda")
    expected = cnn_ext.functional.conv2d(x, w, padding=1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = cnn_ext.functional.conv2d(x, w, padding=1)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(got, expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_second_gpu():
    x = torch.randn(2, 3, 9, 9, device="cuda:1", requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device="cuda:1", requires_grad=True)
    out = cnn_ext.functional.max_pool2d(cnn_ext.functional.conv2d(x, w, padding=1), 2)
    assert out.device == torch.device("cuda:1")
    out.sum().backward()
    ref = F.max_pool2d(F.conv2d(x.detach(), w.detach(), padding=1), 2)
    torch.testing.assert_close(out, ref)
