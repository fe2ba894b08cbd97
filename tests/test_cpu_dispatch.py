"""Every CPU algorithm on every ISA this machine can run (cnn_ext.cpu_dispatch), against torch: forward and every
gradient, on the same shapes, with the dispatch record proving which algorithm and ISA served each call. The
"default" ISA is the portable code that machines without AVX2 (and non-x86 ones) get.

Also: the ISA follows torch's ATEN_CPU_CAPABILITY, CNN_EXT_CPU_ALGORITHMS forces algorithms for a process, and the
dispatch tables are complete."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import cnn_ext
from _support import assert_close, grads
from cnn_ext import cpu_dispatch

ISAS = cpu_dispatch.available_isas()
ops = torch.ops.cnn_ext

# (n, c, h, w, k, kernel, stride, padding, dilation, groups)
CONV_SHAPES = {
    "3x3_same": (3, 5, 11, 13, 7, 3, 1, 1, 1, 1),
    "17_images": (17, 4, 9, 9, 6, 3, 1, 1, 1, 1),  # a full block of 16 images in the lanes and a partial one
    "valid_dilated": (2, 6, 12, 10, 8, (5, 3), 1, 0, 2, 1),
    "one_channel": (16, 1, 14, 14, 10, 5, 1, 0, 1, 1),
    "strided_grouped": (2, 6, 11, 11, 4, 3, 2, 1, 1, 2),
    "3x3_grouped_pad2": (2, 6, 9, 8, 4, 3, 1, 2, 1, 2),  # odd and even output sizes: partial Winograd tiles
    "3x3_pad3": (1, 3, 5, 6, 2, 3, 1, 3, 1, 1),  # Winograd's forward; its dgrad needs padding <= 2
    "depthwise_s2": (2, 6, 11, 10, 6, 3, 2, 1, 1, 6),
    "depthwise_5x3_dilated": (3, 4, 9, 12, 4, (5, 3), 1, 2, 2, 4),
    "depthwise_s3_wide": (1, 20, 13, 40, 20, 3, 3, 1, 1, 20),  # rows of several vectors, a stride of 3 phases
    # One image, weights outweighing its planes: the implicit products split their output channels across the
    # threads (ragged last parts), reading the weights in place.
    "one_image_many_channels": (1, 40, 5, 6, 52, 3, 1, 1, 1, 1),
    "one_image_grouped": (1, 48, 4, 4, 60, 3, 1, 1, 1, 2),
    # Winograd on few tiles and many channels: output channels in blocks, each thread transforming its blocks of U.
    "one_image_output_blocks": (1, 130, 5, 6, 140, 3, 1, 1, 1, 1),
    "strided_dilated": (2, 5, 13, 14, 6, (3, 2), 3, 1, 2, 1),  # stride phases of a dilated kernel
    # 1x1 kernels: the input read in place (transposed wgrad, implicit fprop), a group's channels inside the
    # planes; and a strided one, whose products read stride-phase windows instead.
    "pointwise": (3, 13, 7, 9, 7, 1, 1, 0, 1, 1),
    "pointwise_grouped": (2, 10, 5, 6, 6, 1, 1, 0, 1, 2),
    "pointwise_strided": (2, 9, 7, 8, 5, 1, 2, 0, 1, 1),
}
# What each algorithm needs beyond what every shape has (see csrc/cpu/dispatch.cpp).
NEEDS = {"dcol": {"stride1"}, "winograd": {"stride1"}, "winograd_4x4": {"stride1"},
         "lanes": {"stride1_for_dgrad", "float32", "one_group", "avx2 or avx512"}}


def _serves(direction, algorithm, shape_name, dtype, isa):
    """Whether `algorithm` can compute this call (else the forced choice falls back to the usual rule)."""
    n, c, h, w, k, kernel, stride, padding, dilation, groups = CONV_SHAPES[shape_name]
    needs = NEEDS.get(algorithm, set())
    if "stride1" in needs and stride != 1:
        return False
    if algorithm == "implicit" and direction == "dgrad":  # fprop's implicit windows take strides, dgrad's do not
        return stride == 1
    if algorithm in ("winograd", "winograd_4x4"):  # undilated 3x3, stride 1; dgrad pads by 2 - padding
        return (kernel == 3 and stride == 1 and dilation == 1
                and (direction != "dgrad" or (padding != "same" and padding <= 2)))
    if algorithm == "depthwise":  # one input and one output channel per group
        return groups == c == k
    if algorithm == "lanes":  # lanes::supports: also at most 512 taps·channels and 64 output channels
        kh, kw = torch.nn.modules.utils._pair(kernel)
        return (dtype == torch.float32 and groups == 1 and isa in ("avx2", "avx512") and c * kh * kw <= 512
                and k <= 64 and (stride == 1 or direction not in ("dgrad", "fused_backward")))
    return True


def _leaf(shape, dtype, generator, scale=1.0):
    """A leaf tensor that needs its gradient: normal values drawn in float64 (the same values in either dtype)."""
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype).requires_grad_()


def _conv_case(shape_name, dtype, generator):
    n, c, h, w, k, kernel, stride, padding, dilation, groups = CONV_SHAPES[shape_name]
    kh, kw = torch.nn.modules.utils._pair(kernel)
    # Weights scaled by 1/sqrt(fan-in), as torch.nn initialises them: outputs stay near 1 however many channels a
    # shape sums, so float32's tolerance holds for ours and for torch's float32 reference alike.
    fan_in = c // groups * kh * kw
    t = lambda *s, scale=1.0: _leaf(s, dtype, generator, scale)  # noqa: E731
    return (t(n, c, h, w), t(k, c // groups, kh, kw, scale=fan_in ** -0.5), t(k)), dict(
        stride=stride, padding=padding, dilation=dilation, groups=groups)


def _check_conv(inputs, args, dtype):
    x, w, b = inputs
    out = cnn_ext.functional.conv2d(x, w, b, **args)
    ref = F.conv2d(x, w, b, **args)
    assert_close(out, ref, dtype, msg="forward")
    grad_out = torch.randn(ref.shape, dtype=dtype)
    for name, got, want in zip(("input", "weight", "bias"), grads(out, [x, w, b], grad_out),
                               grads(ref, [x, w, b], grad_out)):
        scale = 1.0 if name == "input" else max(1.0, (ref.shape[0] * ref.shape[2] * ref.shape[3]) ** 0.5)
        assert_close(got, want, dtype, scale=scale, msg=f"grad {name}")


def _algorithms(direction):
    return [row[0] for row in cpu_dispatch.tables()[direction]]


CONV_CASES = [(isa, direction, algorithm) for isa in ISAS for direction in ("fprop", "dgrad", "wgrad")
              for algorithm in _algorithms(direction)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("isa, direction, algorithm", CONV_CASES, ids=["-".join(c) for c in CONV_CASES])
def test_conv_algorithm_on_isa(isa, direction, algorithm, dtype):
    g = torch.Generator().manual_seed(0)
    for shape_name in CONV_SHAPES:
        inputs, args = _conv_case(shape_name, dtype, g)
        with cpu_dispatch.forced(isa=isa, **{direction: algorithm}), cpu_dispatch.recording() as calls:
            _check_conv(inputs, args, dtype)
        served = [(a, i) for d, a, i in calls if d == direction]
        assert served, f"{shape_name}: no {direction} call recorded"
        assert all(i == isa for _, i in served), f"{shape_name}: ran on {served}, not {isa}"
        if _serves(direction, algorithm, shape_name, dtype, isa):
            assert all(a == algorithm for a, _ in served), f"{shape_name}: {served} instead of {algorithm}"
        else:
            assert all(a != algorithm for a, _ in served), f"{shape_name}: {algorithm} cannot serve this"


# Output widths around every column panel width (16 to 64 columns on AVX-512, 8 to 24 on AVX2 and the portable
# code) and output channel counts of every micro-kernel height: a GEMM's ragged last column panel runs on a narrower
# kernel of the same height, one or more vectors short of the full one (csrc/cpu/gemm.h).
EDGE_WIDTHS = (1, 7, 9, 15, 17, 23, 25, 31, 33, 41, 47, 49, 57, 63, 65, 70, 97)
EDGE_CHANNELS = (5, 6, 8, 10, 12, 64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("isa", ISAS)
def test_gemm_ragged_column_panels(isa, dtype):
    g = torch.Generator().manual_seed(0)
    t = lambda *s, scale=1.0: _leaf(s, dtype, g, scale)  # noqa: E731
    for k in EDGE_CHANNELS:
        for width in EDGE_WIDTHS:
            for kernel, padding in ((1, 0), (3, 1)):
                # One output row per image: the products' columns are that row's positions.
                inputs = (t(2, 7, 1, width), t(k, 7, kernel, kernel, scale=(7 * kernel * kernel) ** -0.5), t(k))
                with cpu_dispatch.forced(isa=isa), cpu_dispatch.recording() as calls:
                    _check_conv(inputs, dict(padding=padding), dtype)
                assert calls and all(i == isa for _, _, i in calls), calls


# Outputs of 16 MiB or more leave the implicit GEMM's product buffer by non-temporal stores (add_streaming in
# csrc/cpu/conv_common.h): the forward's output (64 channels) and the input gradient (64 input channels), with rows
# of 130 or 92 values, not whole vectors, for the stores' scalar head and tail. The other side has 32 channels, so
# that A (64 x 32 x 9) is too large for the row-by-row GEMMs, which write the output in place.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("isa", ISAS)
def test_large_outputs_stream(isa, dtype):
    g = torch.Generator().manual_seed(2)
    size = 130 if dtype == torch.float32 else 92
    t = lambda *s, scale=1.0: _leaf(s, dtype, g, scale)  # noqa: E731
    for c, k in ((32, 64), (64, 32)):
        inputs = (t(4, c, size, size), t(k, c, 3, 3, scale=(9 * c) ** -0.5), t(k))
        with cpu_dispatch.forced(isa=isa, fprop="implicit", dgrad="implicit"), cpu_dispatch.recording() as calls:
            _check_conv(inputs, dict(padding=1), dtype)
        assert 4 * max(c, k) * size * size * inputs[0].element_size() >= 16 << 20
        assert {(d, a) for d, a, _ in calls} >= {("fprop", "implicit"), ("dgrad", "implicit")}, calls


# Wide output rows and few input channels (A within 64 KiB: a network's stem) make each output row an implicit GEMM
# of its own, written in place (csrc/cpu/conv_common.h, implicit_row_by_row): rows of 95 to 200 columns, two or more
# column panels with a ragged last one on every ISA, 10 and 64 output channels (a ragged last row panel), bias
# added after, strides 1 and 2; the input gradient's implicit windows the same way with 3 input channels.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("isa", ISAS)
def test_implicit_output_rows_in_place(isa, dtype):
    g = torch.Generator().manual_seed(4)
    t = lambda *s, scale=1.0: _leaf(s, dtype, g, scale)  # noqa: E731
    for k in (10, 64):
        for width, kernel, stride, padding in ((97, 3, 1, 1), (130, 3, 1, 0), (200, 5, 1, 2), (229, 7, 2, 3)):
            inputs = (t(2, 3, 9, width), t(k, 3, kernel, kernel, scale=(3 * kernel * kernel) ** -0.5), t(k))
            with cpu_dispatch.forced(isa=isa, fprop="implicit", dgrad="implicit"), cpu_dispatch.recording() as calls:
                _check_conv(inputs, dict(stride=stride, padding=padding), dtype)
            expected = {("fprop", "implicit")} | ({("dgrad", "implicit")} if stride == 1 else set())
            assert {(d, a) for d, a, _ in calls} >= expected, calls


# A stride-2 window's phases are gathered in whole vectors (conv_common.h, gather_evens: two loads, their even lanes)
# and the rest of a phase row element by element. Every phase-row length from 1 to past two vectors of 16 floats,
# both column phases, left padding 0, 1 or 3 (the first column read in the plane or not) and the plane's last column
# read or not, on every ISA: the forward and the weight gradient, whose implicit and transposed products read the
# windows.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("isa", ISAS)
def test_stride_two_windows_of_every_width(isa, dtype):
    g = torch.Generator().manual_seed(5)
    t = lambda *s, scale=1.0: _leaf(s, dtype, g, scale)  # noqa: E731
    for width in range(1, 72):
        for kernel, padding in ((1, 0), (3, 1), (4, 3), (2, 0)):
            if width + 2 * padding < kernel:
                continue
            inputs = (t(2, 2, 5, width), t(3, 2, kernel, kernel, scale=(2 * kernel * kernel) ** -0.5), t(3))
            with cpu_dispatch.forced(isa=isa, fprop="implicit", wgrad="transposed"), \
                    cpu_dispatch.recording() as calls:
                _check_conv(inputs, dict(stride=2, padding=padding), dtype)
            assert {("fprop", "implicit", isa), ("wgrad", "transposed", isa)} <= set(calls), calls


# The weight gradient's Winograd and GEMM read channels-last copies of dY and x: kept in scratch from call to call up
# to 64 MiB (conv_wgrad.cpp, kKeptCopyBytes), fresh tensors past it. A kept copy must hold this call's data, not a
# larger earlier call's, and the kernel's own scratch must not overlap it; the 72 MB input takes the fresh path.
@pytest.mark.parametrize("algorithm", ["winograd", "gemm"])
def test_weight_gradient_copies(algorithm):
    g = torch.Generator().manual_seed(3)
    shapes = [(2, 8, 40, 40), (1, 8, 9, 11), (1, 8, 1500, 1500)]
    for shape in shapes:
        x = _leaf(shape, torch.float32, g)
        w = _leaf((8, 8, 3, 3), torch.float32, g, scale=72 ** -0.5)
        grad_out = torch.randn(shape, generator=g)
        with cpu_dispatch.forced(wgrad=algorithm), cpu_dispatch.recording() as calls:
            got = torch.ops.cnn_ext.conv2d_backward_weight(grad_out, x, w.shape, [1, 1], [1, 1], [1, 1], 1)
        assert calls == [("wgrad", algorithm, cpu_dispatch.capability())], calls
        want = torch.ops.aten.convolution_backward(grad_out, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                   [False, True, False])[1]
        assert_close(got, want, torch.float32, scale=(shape[0] * shape[2] * shape[3]) ** 0.5, msg=str(shape))
    assert x.numel() * x.element_size() > 64 << 20


FUSED_SHAPES = {  # conv shape name, pooling (kernel, stride, padding, ceil_mode)
    "mnist_like": ("17_images", (2, 2, 0, False)),
    "overlapping_ceil": ("3x3_same", (3, 2, 1, True)),
    "valid_dilated": ("valid_dilated", (2, 2, 0, True)),
    "strided": ("strided_dilated", (2, 2, 0, True)),  # the convolution's stride phases under the pooling
    "strided_grouped": ("strided_grouped", (3, 2, 1, False)),
}
FUSED_CASES = [(isa, direction, algorithm) for isa in ISAS for direction in ("fused_forward", "fused_backward")
               for algorithm in _algorithms(direction)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("isa, direction, algorithm", FUSED_CASES, ids=["-".join(c) for c in FUSED_CASES])
def test_fused_algorithm_on_isa(isa, direction, algorithm, dtype):
    g = torch.Generator().manual_seed(1)
    for conv_name, (kernel, stride, padding, ceil_mode) in FUSED_SHAPES.values():
        (x, w, b), args = _conv_case(conv_name, dtype, g)
        pool = dict(pool_kernel_size=kernel, pool_stride=stride, pool_padding=padding, ceil_mode=ceil_mode)
        with cpu_dispatch.forced(isa=isa, **{direction: algorithm}), cpu_dispatch.recording() as calls:
            out = cnn_ext.functional.conv2d_maxpool_relu(x, w, b, **args, **pool)
            grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
            got = grads(out, [x, w, b], grad_out)
        ref = torch.relu(F.max_pool2d(F.conv2d(x, w, b, **args), kernel, stride, padding, ceil_mode=ceil_mode))
        assert_close(out, ref, dtype, msg="forward")
        scale = max(1.0, (ref.shape[0] * ref.shape[2] * ref.shape[3]) ** 0.5)
        for name, a, e in zip(("input", "weight", "bias"), got, grads(ref, [x, w, b], grad_out)):
            assert_close(a, e, dtype, scale=1.0 if name == "input" else scale * 4, msg=f"grad {name}")
        served = [a for d, a, i in calls if d == direction and i == isa]
        assert served, f"{conv_name}: no {direction} call on {isa} recorded ({calls})"
        if algorithm != "lanes" or _serves(direction, algorithm, conv_name, dtype, isa):
            assert served[0] == algorithm, f"{conv_name}: {served} instead of {algorithm}"


POOL_CASES = [(isa, direction, algorithm) for isa in ISAS
              for direction in ("max_pool_forward", "avg_pool_forward", "avg_pool_backward")
              for algorithm in _algorithms(direction)]
POOLINGS = [dict(kernel_size=2, stride=2, padding=0, ceil_mode=False),  # tiles the 24x24 input
            dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
            dict(kernel_size=(3, 2), stride=(1, 3), padding=(1, 0), ceil_mode=False),
            dict(kernel_size=5, stride=5, padding=0, ceil_mode=True),  # the last windows clipped
            dict(kernel_size=(3, 5), stride=(3, 5), padding=0, ceil_mode=False)]  # 4 columns in no window


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("isa, direction, algorithm", POOL_CASES, ids=["-".join(c) for c in POOL_CASES])
def test_pool_algorithm_on_isa(isa, direction, algorithm, dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 24, 24, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    ran = set()
    for pool in POOLINGS:
        with cpu_dispatch.forced(isa=isa, **{direction: algorithm}), cpu_dispatch.recording() as calls:
            out, idx = cnn_ext.functional.max_pool2d(x, **pool, return_indices=True)
            avg = cnn_ext.functional.avg_pool2d(x, **pool)
            grad_out = torch.randn(avg.shape, generator=g, dtype=torch.float64).to(dtype)
            (got_max,), (got_avg,) = grads(out, [x], grad_out), grads(avg, [x], grad_out)
        ref, ref_idx = F.max_pool2d(x, **pool, return_indices=True)
        ref_avg = F.avg_pool2d(x, **pool)
        assert_close(out, ref, dtype)
        assert_close(avg, ref_avg, dtype)
        assert torch.equal(idx, ref_idx)
        assert_close(got_max, grads(ref, [x], grad_out)[0], dtype)
        assert_close(got_avg, grads(ref_avg, [x], grad_out)[0], dtype)
        ran |= {a for d, a, i in calls if d == direction and i == isa}
    assert algorithm in ran, f"{algorithm} never served {direction} ({ran})"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("isa", ISAS)
def test_tiled_max_pool_rows_of_every_width(isa, dtype, threads):
    """The tiled 2x2 max pooling holds a row pair's windows in vector lanes, its vectors running past the row into
    the next row pairs, and the last row pairs of each task go window by window. Rows of 1 to 35 windows (one
    vector and a few, partial and full), ties (the first tap wins), NaN (the last wins) and -inf, one and two
    tasks; values and indices against torch's."""
    g = torch.Generator().manual_seed(3)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for q in [1, 2, 3, 4, 5, 7, 8, 9, 12, 14, 16, 17, 35]:
            x = torch.randint(-2, 3, (3, 5, 6, 2 * q), generator=g).to(dtype)  # few values: many ties
            x.view(-1)[torch.randperm(x.numel(), generator=g)[:x.numel() // 10]] = float("nan")
            x.view(-1)[torch.randperm(x.numel(), generator=g)[:x.numel() // 10]] = float("-inf")
            with cpu_dispatch.forced(isa=isa), cpu_dispatch.recording() as calls:
                out, idx = cnn_ext.functional.max_pool2d(x, 2, return_indices=True)
            ref, ref_idx = F.max_pool2d(x, 2, return_indices=True)
            assert calls == [("max_pool_forward", "tiled_2x2", isa)], calls
            torch.testing.assert_close(out, ref, equal_nan=True, rtol=0, atol=0, msg=f"{q} windows per row")
            assert torch.equal(idx, ref_idx), f"{q} windows per row"
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("isa", ISAS)
def test_dgrad_of_valid_convolutions_on_small_planes(isa):
    """A valid 3x3 convolution's dgrad on small planes (DeepMNIST's last layer: 64 -> 128 channels, 7x7 -> 5x5):
    dcol, its GEMM's columns several images' dY planes; below 128 channels in all the lanes kernels (float32, on
    ISAs that have them); never Winograd, whose tiles would cover dY padded by 2. Values against torch's."""
    g = torch.Generator().manual_seed(4)
    for n, c, k, size, dtype in [(16, 64, 128, 7, torch.float32), (17, 64, 128, 7, torch.float64),
                                 (16, 32, 64, 9, torch.float32)]:
        w = torch.randn(k, c, 3, 3, generator=g, dtype=torch.float64).to(dtype)
        dy = torch.randn(n, k, size - 2, size - 2, generator=g, dtype=torch.float64).to(dtype)
        with cpu_dispatch.forced(isa=isa), cpu_dispatch.recording() as calls:
            got = ops.conv2d_backward_input(dy, w, [n, c, size, size], [1, 1], [0, 0], [1, 1], 1)
        lanes = dtype == torch.float32 and isa != "default"
        expected = "lanes" if lanes and c + k < 128 else "dcol"
        assert calls == [("dgrad", expected, isa)], calls
        want = torch.ops.aten.convolution_backward(dy, torch.empty(n, c, size, size, dtype=dtype), w, None, [1, 1],
                                                   [0, 0], [1, 1], False, [0, 0], 1, [True, False, False])[0]
        assert_close(got, want, dtype, scale=(k * 9) ** 0.5)


# dcol's interleaved columns (csrc/cpu/conv_common.h, DcolPlan): several images per item with dY rows shorter than
# 16 values, col2im over all of them at once and their planes transposed back, padded planes included; last items
# with fewer images (one, for 21 images), dilation, groups, a 5x5 kernel; and 18-value rows, which keep the images'
# planes side by side. Forced dcol, values against torch's.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("isa", ISAS)
def test_dcol_interleaved_images(isa, dtype):
    g = torch.Generator().manual_seed(5)
    for n, c, k, size, kernel, padding, dilation, groups in [
            (33, 16, 24, 7, 3, 0, 1, 1), (21, 16, 32, 6, 3, 2, 1, 1), (19, 20, 24, 8, 3, 1, 2, 1),
            (17, 32, 32, 7, 3, 1, 1, 2), (9, 8, 16, 5, 5, 2, 1, 1), (12, 8, 8, 20, 3, 0, 1, 1)]:
        out = size + 2 * padding - dilation * (kernel - 1)
        w = torch.randn(k, c // groups, kernel, kernel, generator=g, dtype=torch.float64).to(dtype)
        dy = torch.randn(n, k, out, out, generator=g, dtype=torch.float64).to(dtype)
        args = ([1, 1], [padding] * 2, [dilation] * 2)
        with cpu_dispatch.forced(isa=isa, dgrad="dcol"), cpu_dispatch.recording() as calls:
            got = ops.conv2d_backward_input(dy, w, [n, c, size, size], *args, groups)
        assert calls == [("dgrad", "dcol", isa)], calls
        want = torch.ops.aten.convolution_backward(dy, torch.empty(n, c, size, size, dtype=dtype), w, None, *args,
                                                   False, [0, 0], groups, [True, False, False])[0]
        assert_close(got, want, dtype, scale=(k // groups * kernel * kernel) ** 0.5, msg=str((n, c, k, size)))


def test_tables_are_complete():
    """Every direction has its algorithms, each with a rule and a reason, and the last serves every call."""
    tables = cpu_dispatch.tables()
    assert set(tables) == {"fprop", "dgrad", "wgrad", "fused_forward", "fused_backward", "max_pool_forward",
                           "avg_pool_forward", "avg_pool_backward"}
    for direction, rows in tables.items():
        assert all(name and when and why for name, when, why in rows), direction
        assert rows[-1][1].startswith("always"), direction


def test_forcing_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown fprop algorithm 'sideways'"):
        with cpu_dispatch.forced(fprop="sideways"):
            pass
    with pytest.raises(ValueError, match="unknown direction 'upwards'"):
        with cpu_dispatch.forced(upwards="lanes"):
            pass
    with pytest.raises(ValueError, match="unknown ISA 'sse9'"):
        with cpu_dispatch.forced(isa="sse9"):
            pass
    assert cpu_dispatch.capability() == cpu_dispatch.machine_capability()


def _python(code, **env):
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True,
                            text=True, timeout=120)
    return result.returncode, result.stdout.strip(), result.stderr


@pytest.mark.parametrize("capability", ISAS)
def test_isa_follows_aten_cpu_capability(capability):
    """ATEN_CPU_CAPABILITY limits our kernels' ISA as it limits torch's."""
    code = ("import torch, cnn_ext; from cnn_ext import cpu_dispatch as d; x = torch.randn(2, 3, 8, 8); "
            "w = torch.randn(4, 3, 3, 3)\n"
            "with d.recording() as calls: cnn_ext.functional.conv2d(x, w)\n"
            "print(torch.backends.cpu.get_cpu_capability().lower(), cnn_ext.cpu_capability(), calls[0][2])")
    code_, out, err = _python(code, ATEN_CPU_CAPABILITY=capability)
    assert code_ == 0, err
    assert out.split() == [capability, capability, capability]


def test_algorithms_forced_by_environment():
    code = ("import torch, cnn_ext; from cnn_ext import cpu_dispatch as d\n"
            "with d.recording() as calls: cnn_ext.functional.conv2d(torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3))\n"
            "print(calls[0][1])")
    assert _python(code, CNN_EXT_CPU_ALGORITHMS="fprop=explicit, dgrad=dcol")[1] == "explicit"
    code_, _, err = _python(code, CNN_EXT_CPU_ALGORITHMS="fprop=sideways")
    assert code_ != 0 and "CNN_EXT_CPU_ALGORITHMS: unknown fprop algorithm 'sideways'" in err
