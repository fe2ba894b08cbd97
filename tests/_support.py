"""Shared helpers for the test suite: devices, dtypes, tolerances and input layouts."""

import pytest
import torch


def cuda_kernels_available():
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("cnn_ext::conv2d", "CUDA")


def _cuda_skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA GPU visible"
    return "cnn_ext was built without CUDA kernels"


# Every device-parametrised test runs on CPU and, where a GPU and a CUDA build exist, on CUDA; otherwise the CUDA
# cases show as skipped with the reason.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not cuda_kernels_available(), reason=_cuda_skip_reason())),
]

# Tolerances for comparing with torch's built-ins. float64 is tight: only summation order differs.
# float32 values here are O(1) sums of up to a few hundred products.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}

LAYOUTS = ["contiguous", "channels_last", "strided"]


def make_tensor(shape, dtype, device, layout="contiguous", generator=None, requires_grad=False):
    """A standard-normal tensor of `shape` whose memory is laid out as `layout`:
    contiguous NCHW, channels_last, or a non-contiguous view (every other column of a wider tensor)."""
    if layout == "strided":
        wide = list(shape)
        wide[-1] *= 2
        t = torch.randn(wide, dtype=torch.float64, generator=generator).to(dtype=dtype, device=device)[..., ::2]
        assert not t.is_contiguous() or t.numel() <= 1
    else:
        t = torch.randn(shape, dtype=torch.float64, generator=generator).to(dtype=dtype, device=device)
        if layout == "channels_last" and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(requires_grad)


def assert_close(actual, expected, dtype, scale=1.0, msg=""):
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=msg or None)


def grads(output, inputs, grad_output):
    """Gradients of `output` w.r.t. the tensors in `inputs` that require grad (None for the others)."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(output, wanted, grad_output))
    return [next(got) if t is not None and t.requires_grad else None for t in inputs]
