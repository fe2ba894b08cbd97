"""Shared helpers for the test suite: devices, dtypes, tolerances and input layouts."""

import pytest
import torch
import torch.nn.functional as F

import cnn_ext


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


def check_max_pool2d(x, case, dtype, grad_generator):
    """Our max_pool2d on x (a leaf requiring grad) against torch's: output, int64 indices (exactly) and the input
    gradient. `case` holds kernel, stride, padding, dilation and ceil_mode."""
    args = dict(kernel_size=case["kernel"], stride=case["stride"], padding=case["padding"],
                dilation=case["dilation"], ceil_mode=case["ceil_mode"], return_indices=True)
    out, idx = cnn_ext.functional.max_pool2d(x, **args)
    ref, ref_idx = F.max_pool2d(x, **args)
    assert out.shape == ref.shape and idx.shape == ref_idx.shape
    assert idx.dtype == torch.int64
    assert_close(out, ref, dtype, msg="forward")
    assert torch.equal(idx, ref_idx), f"indices differ:\n{idx}\n{ref_idx}"
    _check_input_grad(out, ref, x, dtype, grad_generator)


def check_avg_pool2d(x, case, dtype, grad_generator):
    """Our avg_pool2d on x against torch's: output and input gradient. `case` holds kernel, stride, padding,
    ceil_mode, count_include_pad and divisor_override."""
    args = dict(kernel_size=case["kernel"], stride=case["stride"], padding=case["padding"],
                ceil_mode=case["ceil_mode"], count_include_pad=case["count_include_pad"],
                divisor_override=case["divisor_override"])
    out = cnn_ext.functional.avg_pool2d(x, **args)
    ref = F.avg_pool2d(x, **args)
    assert out.shape == ref.shape
    assert_close(out, ref, dtype, msg="forward")
    _check_input_grad(out, ref, x, dtype, grad_generator)


def _check_input_grad(out, ref, x, dtype, grad_generator):
    grad_out = make_tensor(ref.shape, dtype, x.device, "contiguous", grad_generator)
    (got,), (want,) = grads(out, [x], grad_out), grads(ref, [x], grad_out)
    assert_close(got, want, dtype, msg="grad input")
