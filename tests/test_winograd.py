"""Winograd F(2x2, 3x3) on the CPU (csrc/cpu/winograd.cpp): forward and input gradient against torch in float64,
its float32 error against a float64 reference per shape class (the README quotes these classes), the shapes that
stress its tiling (odd sizes, padding 0-2, groups, items spanning images, 1x1 outputs), and the dispatch rule that
chooses it. tests/test_cpu_dispatch.py runs it on every ISA as well."""

import pytest
import torch
import torch.nn.functional as F

import cnn_ext  # noqa: F401
from cnn_ext import cpu_dispatch

ops = torch.ops.cnn_ext

# (n, c, h, w, k, padding, groups)
TILING_SHAPES = {
    "odd_13x11": (2, 5, 13, 11, 7, 1, 1),
    "pad0": (3, 4, 9, 8, 6, 0, 1),
    "pad2": (2, 3, 6, 7, 5, 2, 1),
    "groups": (2, 8, 10, 9, 6, 1, 2),
    "items_span_images": (9, 6, 5, 6, 4, 1, 1),  # 3x3 tiles per image: runs of tile rows cross images
    "one_output": (2, 3, 3, 3, 2, 0, 1),
    "one_pixel": (1, 2, 1, 1, 3, 1, 1),
}


def _products(x, w, b, dy, padding, groups, algorithm):
    with cpu_dispatch.forced(fprop=algorithm, dgrad=algorithm), cpu_dispatch.recording() as calls:
        y = ops.conv2d(x, w, b, [1, 1], [padding, padding], [1, 1], groups)
        dx = ops.conv2d_backward_input(dy, w, list(x.shape), [1, 1], [padding, padding], [1, 1], groups)
    return y, dx, calls


def _reference(x, w, b, dy, padding, groups):
    x64, w64, dy64 = x.double(), w.double(), dy.double()
    y = F.conv2d(x64, w64, None if b is None else b.double(), padding=padding, groups=groups)
    dx = torch.ops.aten.convolution_backward(dy64, x64, w64, None, [1, 1], [padding, padding], [1, 1], False, [0, 0],
                                             groups, [True, False, False])[0]
    return y, dx


@pytest.mark.parametrize("shape", TILING_SHAPES.values(), ids=TILING_SHAPES.keys())
def test_tiling_matches_torch_in_float64(shape):
    n, c, h, w, k, padding, groups = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    wt = torch.randn(k, c // groups, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(k, generator=g, dtype=torch.float64)
    dy = torch.randn(n, k, h + 2 * padding - 2, w + 2 * padding - 2, generator=g, dtype=torch.float64)
    y, dx, calls = _products(x, wt, b, dy, padding, groups, "winograd")
    assert [(d, a) for d, a, _ in calls] == [("fprop", "winograd"), ("dgrad", "winograd")]
    ref_y, ref_dx = _reference(x, wt, b, dy, padding, groups)
    torch.testing.assert_close(y, ref_y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-10, atol=1e-10)


def test_dgrad_with_padding_over_two_falls_back():
    """dX is Winograd on dY padded by 2 - padding: padding 3 cannot be, so the usual rule serves it."""
    x, w, dy = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), torch.randn(1, 3, 9, 9)
    _, dx, calls = _products(x, w, None, dy, 3, 1, "winograd")
    assert [(d, a) for d, a, _ in calls][0] == ("fprop", "winograd") and calls[1][1] != "winograd"
    torch.testing.assert_close(dx, _reference(x, w, None, dy, 3, 1)[1].float(), rtol=1e-4, atol=1e-4)


# The classes whose float32 error the README states: (n, channels, size), weights scaled by 1/sqrt(fan-in) as
# torch.nn initialises them, inputs and gradients standard normal.
ERROR_CLASSES = {
    "16ch_32x32": (2, 16, 32),
    "64ch_28x28": (2, 64, 28),
    "128ch_14x14": (2, 128, 14),
    "256ch_7x7": (2, 256, 7),
}


@pytest.mark.parametrize("shape", ERROR_CLASSES.values(), ids=ERROR_CLASSES.keys())
def test_float32_error_within_the_suite_tolerance(shape):
    """float32 Winograd against the float64 reference: within the suite's float32 tolerance (1e-4 relative and
    absolute), and no worse than twice the implicit GEMM's own error (measured: 0.3-0.5x of it, since each output
    sums over the channels only, not channels x taps)."""
    n, c, size = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, c, size, size, generator=g)
    w = torch.randn(c, c, 3, 3, generator=g) / (9 * c) ** 0.5
    dy = torch.randn(n, c, size, size, generator=g)
    ref_y, ref_dx = _reference(x, w, None, dy, 1, 1)
    errors = {}
    for algorithm in ("winograd", "implicit"):
        y, dx, _ = _products(x, w, None, dy, 1, 1, algorithm)
        errors[algorithm] = max((y.double() - ref_y).abs().max().item(), (dx.double() - ref_dx).abs().max().item())
        torch.testing.assert_close(y.double(), ref_y, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(dx.double(), ref_dx, rtol=1e-4, atol=1e-4)
    assert errors["winograd"] <= 2 * errors["implicit"], errors


@pytest.mark.parametrize("shape, chosen", [
    ((8, 64, 14, 14, 64), True),  # ResNet-like: 392 tiles, 64 channels
    ((2, 32, 28, 28, 64), True),
    ((8, 16, 14, 14, 16), False),  # too few channels
    ((1, 256, 14, 14, 256), False),  # 49 tiles do not pay for transforming 256x256 kernels
    ((32, 32, 8, 8, 32), False),  # 32 + 32 channels: a tie with the implicit GEMM
])
def test_dispatch_rule(shape, chosen):
    n, c, size, _, k = shape
    x, w, dy = torch.randn(n, c, size, size), torch.randn(k, c, 3, 3), torch.randn(n, k, size, size)
    with cpu_dispatch.recording() as calls:
        ops.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1)
        ops.conv2d_backward_input(dy, w, [n, c, size, size], [1, 1], [1, 1], [1, 1], 1)
        ops.conv2d(x, w, None, [2, 2], [1, 1], [1, 1], 1)  # strided: never Winograd
    assert [a == "winograd" for _, a, _ in calls] == [chosen, chosen, False]
