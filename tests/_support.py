"""Shared helpers for the test suite: devices, dtypes, tolerances and input layouts."""

import pytest
import torch
import torch.nn.functional as F

import cnn_ext
from cnn_ext import cuda_emulation


def cuda_kernels_available():
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("cnn_ext::conv2d", "CUDA")


def _cuda_skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA GPU visible"
    return "cnn_ext was built without CUDA kernels"


class Emulated(str):
    """The device "cpu" (tensors live there) for a test whose cnn_ext operators run the CUDA kernels on the CPU
    emulator (cnn_ext.cuda_emulation); conftest.py switches the emulation on for tests marked `emulated`."""

    def __new__(cls):
        return super().__new__(cls, "cpu")


def is_emulated(device):
    return isinstance(device, Emulated)


def cpu_kernels_serve(device):
    """Whether cnn_ext's CPU kernels (not CUDA's, nor the emulated CUDA ones) serve tensors on `device`."""
    return device == "cpu" and not is_emulated(device)


# Every device-parametrised test runs on CPU, on the CUDA kernels through the CPU emulator (id "emulated") and,
# where a GPU and a CUDA build exist, on CUDA (marked `gpu`); otherwise the CUDA cases show as skipped with the
# reason.
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu,
                                   pytest.mark.skipif(not cuda_kernels_available(), reason=_cuda_skip_reason())])
EMULATED = pytest.param(Emulated(), id="emulated", marks=[
    pytest.mark.emulated,
    pytest.mark.skipif(not cuda_emulation.available(), reason="cnn_ext was built without the CUDA emulator")])
DEVICES = ["cpu", CUDA, EMULATED]
# Where cnn_ext's CUDA kernels run: on a GPU, and on the CPU through the emulator.
CUDA_KERNEL_DEVICES = [CUDA, EMULATED]


def needs_gpu(test):
    """Marks a test that needs a CUDA GPU and cnn_ext's CUDA kernels `gpu`; elsewhere it is skipped, with the reason."""
    return pytest.mark.gpu(pytest.mark.skipif(not cuda_kernels_available(), reason=_cuda_skip_reason())(test))

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


def batch_norm_case(shape, dtype, g, mean=2.0, spread=3.0, affine=True):
    """A batch norm's arguments drawn from generator g: the input (mean ± spread, requiring grad), weight and bias
    (requiring grad; None unless affine) and running statistics (mean, var)."""
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * spread + mean).to(dtype).requires_grad_()
    c = shape[1]
    w = (torch.randn(c, generator=g, dtype=torch.float64) + 1).to(dtype).requires_grad_() if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if affine else None
    running = (torch.randn(c, generator=g, dtype=torch.float64).to(dtype),
               (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype))
    return x, w, b, running


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
    x_ref = x
    if x.is_cuda and not x.is_contiguous() and any(torch.nn.modules.utils._pair(case["padding"])):
        # torch's own CUDA kernel for the channels_last backward with padding returns wrong gradients in torch 2.11
        # (pytorch/pytorch#188344, fixed later; seen on the GPU machine): the reference comes from an NCHW copy,
        # whose kernel is right.
        x_ref = x.detach().contiguous().requires_grad_(True)
    ref = F.avg_pool2d(x_ref, **args)
    assert out.shape == ref.shape
    assert_close(out, ref, dtype, msg="forward")
    _check_input_grad(out, ref, x, dtype, grad_generator, x_ref)


def _check_input_grad(out, ref, x, dtype, grad_generator, x_ref=None):
    """The input gradients of our `out` (w.r.t. x) and torch's `ref` (w.r.t. x_ref, by default x itself)."""
    grad_out = make_tensor(ref.shape, dtype, x.device, "contiguous", grad_generator)
    (got,), (want,) = grads(out, [x], grad_out), grads(ref, [x if x_ref is None else x_ref], grad_out)
    assert_close(got, want, dtype, msg="grad input")


# Unit roundoff (half the machine epsilon) of the formats the CUDA kernels store, and half their smallest subnormal.
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}
HALF_SUBNORMAL = {torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}


def accumulation_bound(magnitude, reference, terms, dtype):
    """The largest |result - reference| a kernel may make, per element, when it takes `dtype` (float16/bfloat16)
    inputs, sums `terms` products of them in float32 in any order and rounds the sum once to `dtype`.

    Products of two such inputs are exact in float32, so the error is the float32 summation's, at most
    γ·Σ|a·b| with γ = n·u32/(1 - n·u32) (Higham, Accuracy and Stability of Numerical Algorithms, §4.2), plus the
    final rounding's, u·|value| (and half the smallest subnormal). `magnitude` is Σ|a·b| and `reference` the exact
    (float64) result. Summing in `dtype` instead errs by up to about n·u·Σ|a·b| and exceeds this bound
    (test_low_precision.py shows it)."""
    u32 = UNIT_ROUNDOFF[torch.float32]
    gamma = terms * u32 / (1 - terms * u32)
    summation = gamma * magnitude
    return UNIT_ROUNDOFF[dtype] * (reference.abs() + summation) + summation + HALF_SUBNORMAL[dtype]


def assert_within_bound(got, reference, bound, what):
    """got (any dtype, any device) against a float64 reference on the CPU, element by element."""
    error = (got.detach().double().cpu() - reference).abs()
    excess = error - bound
    worst = int(excess.argmax())
    assert (excess <= 0).all(), (
        f"{what}: {int((excess > 0).sum())} of {error.numel()} elements exceed their accumulation bound; worst "
        f"error {error.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g} (reference "
        f"{reference.flatten()[worst]:.6g})")
