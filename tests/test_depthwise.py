"""Depthwise convolutions on the CPU (csrc/cpu/conv_depthwise.cpp): the forward and both gradients against torch in
float64 over random kernel sizes, strides (column strides as phases), paddings and dilations, in float32 within the
suite's tolerance, on every ISA, and the dispatch rule that chooses them. tests/test_cpu_dispatch.py runs them
forced beside every other algorithm as well."""

import random

import pytest
import torch
import torch.nn.functional as F

from cnn_ext import cpu_dispatch

ops = torch.ops.cnn_ext
aten = torch.ops.aten


def _random_shapes(count, seed):
    """(n, c, h, w, kernel, stride, padding, dilation) with at least one output."""
    rng = random.Random(seed)
    shapes = []
    while len(shapes) < count:
        n, c, h, w = rng.randint(1, 3), rng.randint(1, 40), rng.randint(1, 40), rng.randint(1, 70)
        kernel = (rng.choice([1, 2, 3, 5, 7]), rng.choice([1, 3, 5]))
        stride, dilation = (rng.choice([1, 2, 3]), rng.choice([1, 2, 3])), (rng.choice([1, 2]), rng.choice([1, 2]))
        padding = (rng.randint(0, kernel[0]), rng.randint(0, kernel[1]))
        out = [(size + 2 * p - d * (k - 1) - 1) // s + 1
               for size, k, s, p, d in zip((h, w), kernel, stride, padding, dilation)]
        if min(out) >= 1:
            shapes.append((n, c, h, w, kernel, stride, padding, dilation))
    return shapes


def _run(shape, dtype, generator, isa=None):
    n, c, h, w, kernel, stride, padding, dilation = shape
    x = torch.randn(n, c, h, w, generator=generator, dtype=torch.float64)
    wt = torch.randn(c, 1, *kernel, generator=generator, dtype=torch.float64)
    b = torch.randn(c, generator=generator, dtype=torch.float64)
    ref_y = F.conv2d(x, wt, b, stride, padding, dilation, c)
    dy = torch.randn(ref_y.shape, generator=generator, dtype=torch.float64)
    ref_dx, ref_dw, _ = aten.convolution_backward(dy, x, wt, None, stride, padding, dilation, False, [0, 0], c,
                                                  [True, True, False])
    args = (list(stride), list(padding), list(dilation), c)
    with cpu_dispatch.forced(isa=isa), cpu_dispatch.recording() as calls:
        y = ops.conv2d(x.to(dtype), wt.to(dtype), b.to(dtype), *args)
        dx = ops.conv2d_backward_input(dy.to(dtype), wt.to(dtype), list(x.shape), *args)
        dw = ops.conv2d_backward_weight(dy.to(dtype), x.to(dtype), list(wt.shape), *args)
    assert [a for _, a, _ in calls] == ["depthwise"] * 3
    return (y, dx, dw), (ref_y, ref_dx, ref_dw)


@pytest.mark.parametrize("isa", cpu_dispatch.available_isas())
def test_random_shapes_match_torch_in_float64(isa):
    g = torch.Generator().manual_seed(0)
    for shape in _random_shapes(40, seed=1):
        for ours, ref in zip(*_run(shape, torch.float64, g, isa)):
            torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"{shape}: {m}")


@pytest.mark.parametrize("isa", cpu_dispatch.available_isas())
def test_float32_within_the_suite_tolerance(isa):
    g = torch.Generator().manual_seed(3)
    shapes = _random_shapes(15, seed=4) + [(2, 96, 56, 56, (3, 3), (2, 2), (1, 1), (1, 1)),  # MobileNet's
                                           (2, 32, 7, 7, (3, 3), (1, 1), (1, 1), (1, 1))]
    for shape in shapes:
        for ours, ref in zip(*_run(shape, torch.float32, g, isa)):
            scale = max(1.0, ref.abs().max().item())
            torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4 * scale,
                                       msg=lambda m: f"{shape}: {m}")


@pytest.mark.parametrize("in_channels, out_channels, groups, chosen", [
    (8, 8, 8, True),
    (1, 1, 1, True),  # one channel: depthwise as well
    (8, 16, 8, False),  # a channel multiplier of 2: two output channels per group
    (8, 8, 4, False),
])
def test_dispatch_rule(in_channels, out_channels, groups, chosen):
    x = torch.randn(2, in_channels, 9, 9)
    w = torch.randn(out_channels, in_channels // groups, 3, 3)
    dy = torch.randn(2, out_channels, 9, 9)
    args = ([1, 1], [1, 1], [1, 1], groups)
    with cpu_dispatch.recording() as calls:
        ops.conv2d(x, w, None, *args)
        ops.conv2d_backward_input(dy, w, list(x.shape), *args)
        ops.conv2d_backward_weight(dy, x, list(w.shape), *args)
    assert [a == "depthwise" for _, a, _ in calls] == [chosen] * 3


def test_huge_stride_and_padding_are_left_to_the_gemm_algorithms():
    """The phase-split scratch grows with the stride and padding: past a few planes' size, the usual algorithms
    serve the call (and agree with torch)."""
    big = 2**24
    x, w = torch.randn(1, 2, 1, 1, dtype=torch.float64), torch.randn(2, 1, 1, 1, dtype=torch.float64)
    with cpu_dispatch.recording() as calls:
        y = ops.conv2d(x, w, None, [big, big], [big, big], [1, 1], 2)
    assert calls[0][1] != "depthwise"
    torch.testing.assert_close(y, F.conv2d(x, w, None, big, big, 1, 2))
