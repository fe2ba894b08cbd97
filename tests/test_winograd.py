"""Winograd on the CPU (csrc/cpu/winograd.cpp): F(2x2, 3x3) and F(4x4, 3x3) for the forward and input gradient,
F(3x3, 2x2) and F(3x3, 4x4) for the weight gradient ("winograd" and "winograd_4x4"), against torch in float64;
their float32 error against a float64 reference per shape class (the README quotes these classes); the shapes that
stress the tiling (odd sizes, padding 0-3, groups, items spanning images, 1x1 outputs, channel counts past whole
vectors); and the dispatch rules that choose them, with the float32 precision condition of the 4x4 tiles.
tests/test_cpu_dispatch.py runs them on every ISA as well."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import cnn_ext  # noqa: F401
from cnn_ext import cpu_dispatch

ops = torch.ops.cnn_ext

# Output tiles (the weight gradient's tiles of dY) of 2x2 and 4x4.
TILES = ("winograd", "winograd_4x4")

# (n, c, h, w, k, padding, groups)
TILING_SHAPES = {
    "odd_13x11": (2, 5, 13, 11, 7, 1, 1),
    "pad0": (3, 4, 9, 8, 6, 0, 1),
    "pad2": (2, 3, 6, 7, 5, 2, 1),
    "groups": (2, 8, 10, 9, 6, 1, 2),
    "items_span_images": (9, 6, 5, 6, 4, 1, 1),  # 3x3 tiles per image: runs of tile rows cross images
    "one_output": (2, 3, 3, 3, 2, 0, 1),
    "one_pixel": (1, 2, 1, 1, 3, 1, 1),
    "sizes_mod_4": (2, 3, 10, 7, 4, 1, 1),  # 10x7 outputs: 2 rows and 3 columns past the last whole 4x4 tile
    # The weight gradient's transforms run along the channels: whole AVX-512 vectors and a tail, per group.
    "channels_past_vectors": (2, 74, 6, 7, 70, 1, 2),
    # Few tiles, many output channels: the tiles as the GEMMs' rows, the output channels in blocks (ragged last
    # one), input channels past whole vectors and past one chunk of the kernel's transform (130 > 128); per group.
    "output_blocks": (1, 130, 5, 6, 140, 1, 1),
    "output_blocks_groups": (1, 256, 4, 5, 256, 1, 2),
    # The tiles as rows with padding 0 and 2 (3x3 and 5x6 outputs: tiles past the plane's edges), and with one
    # block of output channels over runs of tile rows (one per thread).
    "rows_pad0": (1, 12, 5, 5, 40, 0, 1),
    "rows_pad2": (1, 9, 3, 4, 30, 2, 1),
    "rows_runs": (2, 6, 4, 3, 20, 1, 1),
}

# Shapes for each orientation of the forward's GEMMs (winograd.cpp's winograd_oriented): the tiles as rows where the
# output channels outnumber twice the tiles ("few_tiles", "runs": one block of output channels over runs of tile
# rows), or with 128+ channels each side where M over all the tiles fits ("m_fits": 64 tiles), or where a row has
# fewer than 4 tiles ("short_rows": 5x5 outputs, 3 or 2 tiles a row), or with 32+ channels each side on up to 640 2x2
# tiles making at most two blocks of output channels ("modest"); as columns with fewer channels or many tiles, in rows
# of 4+ ("columns", 16x16: 8 or 4 tiles a row). As rows, each thread transforms its own V, per run, where U is held
# whole with at most two blocks of output channels a thread ("runs", "m_fits", "m_fits_runs", "modest", "few_tiles" on
# 2 and 3 threads) or where U is not held whole and a run's V is within 1 MiB ("many_inputs": 4 blocks over one run, a
# thread's second block reusing the V of its first); else V is made once for all the threads ("few_tiles" on one,
# "m_within_l2"). (n, c, size, k)
ORIENTATIONS = {
    "few_tiles": (1, 70, 5, 150),
    "runs": (3, 8, 4, 30),
    "m_fits": (1, 128, 16, 128),
    # 196 tiles in 14 rows of 14 (ResNet's batch-1 128-channel layer), an M of 784 KiB: runs of tile rows, as many
    # rows a run as fill whole row panels (3 on AVX-512's 6-row panels: 33 panels per block, not 4's 35)
    "m_fits_runs": (1, 128, 28, 128),
    # 294 tiles (2x2) with 256 channels each side, an M of 1.2 MiB: as rows below one core's L2 (2 MiB, as on the
    # Intel machines; M a quarter of L2 or more, so U's chunk is half of L2: all 256 input channels at once), as
    # columns where it is 1 MiB
    "m_within_l2": (6, 256, 14, 256),
    "many_inputs": (1, 256, 7, 256),
    # 392 tiles (2x2) with 32 channels each side: as rows where they make at most two blocks of output channels
    # ("modest": one on AVX-512)
    "modest": (2, 32, 28, 32),
    "short_rows": (6, 20, 5, 24),
    "columns": (4, 12, 16, 10),
}


def _products(x, w, b, dy, padding, groups, algorithm, wgrad_algorithm=None):
    """y, dx and dw by the forced algorithms (wgrad's defaults to `algorithm`), and the record of what ran."""
    forced = dict(fprop=algorithm, dgrad=algorithm, wgrad=wgrad_algorithm or algorithm)
    with cpu_dispatch.forced(**forced), cpu_dispatch.recording() as calls:
        y = ops.conv2d(x, w, b, [1, 1], [padding, padding], [1, 1], groups)
        dx = ops.conv2d_backward_input(dy, w, list(x.shape), [1, 1], [padding, padding], [1, 1], groups)
        dw = ops.conv2d_backward_weight(dy, x, list(w.shape), [1, 1], [padding, padding], [1, 1], groups)
    return y, dx, dw, calls


def _reference(x, w, b, dy, padding, groups):
    x64, w64, dy64 = x.double(), w.double(), dy.double()
    y = F.conv2d(x64, w64, None if b is None else b.double(), padding=padding, groups=groups)
    dx, dw, _ = torch.ops.aten.convolution_backward(dy64, x64, w64, None, [1, 1], [padding, padding], [1, 1], False,
                                                    [0, 0], groups, [True, True, False])
    return y, dx, dw


@pytest.mark.parametrize("algorithm", TILES)
@pytest.mark.parametrize("shape", TILING_SHAPES.values(), ids=TILING_SHAPES.keys())
def test_tiling_matches_torch_in_float64(shape, algorithm):
    n, c, h, w, k, padding, groups = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    wt = torch.randn(k, c // groups, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(k, generator=g, dtype=torch.float64)
    dy = torch.randn(n, k, h + 2 * padding - 2, w + 2 * padding - 2, generator=g, dtype=torch.float64)
    *products, calls = _products(x, wt, b, dy, padding, groups, algorithm)
    assert [(d, a) for d, a, _ in calls] == [("fprop", algorithm), ("dgrad", algorithm), ("wgrad", algorithm)]
    for ours, ref in zip(products, _reference(x, wt, b, dy, padding, groups)):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("algorithm", TILES)
def test_padding_over_two(algorithm):
    """dX is Winograd on dY padded by 2 - padding: padding 3 cannot be, so the usual rule serves it; the forward
    and the weight gradient take any padding (their tiles read zeros past the input)."""
    g = torch.Generator().manual_seed(2)
    x, w, dy = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((2, 2, 5, 6), (3, 2, 3, 3), (2, 3, 9, 10)))
    *products, calls = _products(x, w, None, dy, 3, 1, algorithm)
    fprop, dgrad, wgrad = (a for _, a, _ in calls)
    assert (fprop, wgrad) == (algorithm, algorithm) and not dgrad.startswith("winograd")
    for ours, ref in zip(products, _reference(x, w, None, dy, 3, 1)):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


# The weight gradient's schedules (winograd_wgrad_tiles): where the tiles number at most twice the output channels
# every tile is transformed once, and the GEMMs run by output-channel blocks (each block's M turned into dW by the
# thread that made it) or, where the blocks would re-read more of V than M holds, whole, their row panels shared out
# among the threads (winograd_wgrad_whole); else by runs of tiles, each thread summing its own M.
# (n, c, size, k, groups): blocks with a ragged last block, per group, and on 4x4 tiles; more blocks than two per
# thread (M's block bounded by half of L2: 200 output channels over 512 input channels on L2s of up to 2 MiB, uneven
# blocks of whole panels); whole GEMMs (144 2x2 tiles, 40 x 80 channels: M is 3200 sums per position, V 144 rows of
# 48+ per block), also per group and with a ragged last row panel; runs with more tiles than the output channels
# allow.
WGRAD_SCHEDULES = {
    "blocks": (1, 40, 6, 50, 1),
    "blocks_bounded_by_l2": (1, 512, 6, 200, 1),
    "blocks_groups": (2, 24, 5, 36, 2),
    "blocks_4x4_tiles": (3, 20, 9, 45, 1),
    "whole": (4, 40, 12, 80, 1),
    "whole_groups": (2, 24, 12, 80, 2),
    "runs": (6, 8, 12, 8, 1),
}


def _few_tiles(shape):
    return shape != WGRAD_SCHEDULES["runs"]


@pytest.mark.parametrize("algorithm", TILES)
@pytest.mark.parametrize("shape", WGRAD_SCHEDULES.values(), ids=WGRAD_SCHEDULES.keys())
def test_weight_gradient_schedules_for_any_thread_count(shape, algorithm):
    """Every schedule matches torch in float64 with 1, 2 and 3 threads; on few tiles (by output blocks or whole
    GEMMs) nothing is summed across the threads, so float32 results are bitwise the same for every thread count."""
    n, c, size, k, groups = shape
    tile = 2 if algorithm == "winograd" else 4
    tiles = n * (-(-size // tile)) ** 2
    assert (tiles <= 2 * k // groups) == _few_tiles(shape), (tiles, k)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, c, size, size, generator=g, dtype=torch.float64)
    dy = torch.randn(n, k, size, size, generator=g, dtype=torch.float64)
    args = ([1, 1], [1, 1], [1, 1], groups)
    want = torch.ops.aten.convolution_backward(dy, x, torch.empty(k, c // groups, 3, 3, dtype=torch.float64), None,
                                               *args[:3], False, [0, 0], groups, [False, True, False])[1]
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with cpu_dispatch.forced(wgrad=algorithm), cpu_dispatch.recording() as calls:
                got = ops.conv2d_backward_weight(dy, x, [k, c // groups, 3, 3], *args)
                results[threads] = ops.conv2d_backward_weight(dy.float(), x.float(), [k, c // groups, 3, 3], *args)
            assert {a for _, a, _ in calls} == {algorithm}, calls
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(results[threads].double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    finally:
        torch.set_num_threads(before)
    if _few_tiles(shape):
        assert torch.equal(results[1], results[2]) and torch.equal(results[1], results[3])


# x and dY as the weight gradient may get them: each NCHW or channels-last (its runs of tiles read either in place,
# copying an image's rows channels-last as they reach them; by blocks it reads channels-last copies), or neither.
LAYOUTS = {
    "nchw": lambda t: t,
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "strided": lambda t: t.repeat_interleave(2, dim=3)[..., ::2],  # every other column of a wider tensor
}


@pytest.mark.parametrize("algorithm", TILES)
@pytest.mark.parametrize("shape", TILING_SHAPES.values(), ids=TILING_SHAPES.keys())
def test_weight_gradient_reads_any_layout(shape, algorithm):
    """The weight gradient from x and dY in every pair of layouts matches torch in float64, and in float32 is
    bitwise the same for every pair (the same sums in the same order), with 2 and 3 threads (runs of tiles that
    start and end mid tile row and cross images)."""
    n, c, h, w, k, padding, groups = shape
    g = torch.Generator().manual_seed(9)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    p, q = h + 2 * padding - 2, w + 2 * padding - 2
    dy = torch.randn(n, k, p, q, generator=g, dtype=torch.float64)
    args = ([k, c // groups, 3, 3], [1, 1], [padding, padding], [1, 1], groups)
    want = torch.ops.aten.convolution_backward(dy, x, torch.empty(args[0], dtype=torch.float64), None, *args[1:4],
                                               False, [0, 0], groups, [False, True, False])[1]
    before = torch.get_num_threads()
    try:
        for threads in (2, 3):
            torch.set_num_threads(threads)
            first = None
            for (x_layout, to_x), (dy_layout, to_dy) in [(a, b) for a in LAYOUTS.items() for b in LAYOUTS.items()]:
                xl, dyl = to_x(x), to_dy(dy)
                assert torch.equal(xl, x) and torch.equal(dyl, dy)
                with cpu_dispatch.forced(wgrad=algorithm), cpu_dispatch.recording() as calls:
                    got = ops.conv2d_backward_weight(dyl, xl, *args)
                    single = ops.conv2d_backward_weight(dyl.float(), xl.float(), *args)
                assert {a for _, a, _ in calls} == {algorithm}, calls
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m: f"{x_layout} x, "
                                           f"{dy_layout} dY: {m}")
                if first is None:
                    first = single
                assert torch.equal(single, first), (x_layout, dy_layout, threads)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("algorithm", TILES)
@pytest.mark.parametrize("shape", ORIENTATIONS.values(), ids=ORIENTATIONS.keys())
def test_orientations_for_any_thread_count(shape, algorithm):
    """The forward and input gradient in both orientations match torch in float64 with 1, 2 and 3 threads; each
    output is one item's, summed in one order, so float32 results are bitwise the same for every thread count."""
    n, c, size, k = shape
    g = torch.Generator().manual_seed(6)
    x = torch.randn(n, c, size, size, generator=g, dtype=torch.float64)
    w = torch.randn(k, c, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(k, generator=g, dtype=torch.float64)
    dy = torch.randn(n, k, size, size, generator=g, dtype=torch.float64)
    want = _reference(x, w, b, dy, 1, 1)[:2]
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with cpu_dispatch.forced(fprop=algorithm, dgrad=algorithm), cpu_dispatch.recording() as calls:
                for dtype in (torch.float64, torch.float32):
                    xd, wd, bd, dyd = (t.to(dtype) for t in (x, w, b, dy))
                    results[threads, dtype] = (ops.conv2d(xd, wd, bd, [1, 1], [1, 1], [1, 1], 1),
                                               ops.conv2d_backward_input(dyd, wd, list(x.shape), [1, 1], [1, 1],
                                                                         [1, 1], 1))
            assert {a for _, a, _ in calls} == {algorithm}, calls
            for got, ref in zip(results[threads, torch.float64], want):
                torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
            for got, ref in zip(results[threads, torch.float32], want):
                torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    finally:
        torch.set_num_threads(before)
    for threads in (2, 3):
        for a, b in zip(results[1, torch.float32], results[threads, torch.float32]):
            assert torch.equal(a, b)


# The classes whose float32 error the README states: (n, channels, size), weights scaled by 1/sqrt(fan-in) as
# torch.nn initialises them, inputs and gradients standard normal.
ERROR_CLASSES = {
    "16ch_32x32": (2, 16, 32),
    "64ch_28x28": (2, 64, 28),
    "128ch_14x14": (2, 128, 14),
    "256ch_7x7": (2, 256, 7),
}


# How many times the error of the implicit GEMM (forward, input gradient) and of the GEMM (weight gradient) each
# algorithm may reach: measured 0.3-0.5x for F(2x2, 3x3) forward and input gradient (each output sums over the
# channels only, not channels x taps), 0.7-1.1x for F(3x3, 2x2) (it sums over the tiles and images as the GEMM
# sums over the positions); 2.3-3.4x and 2.2-2.6x for the 4x4 tiles (their coefficients up to 8 cancel more).
ERROR_BOUNDS = {"winograd": 2, "winograd_4x4": 5}


@pytest.mark.parametrize("algorithm", TILES)
@pytest.mark.parametrize("shape", ERROR_CLASSES.values(), ids=ERROR_CLASSES.keys())
def test_float32_error_within_the_suite_tolerance(shape, algorithm):
    """float32 Winograd against the float64 reference: every element within a quarter of the suite's float32
    tolerance (1e-4 absolute plus 1e-4 relative, the weight gradient's absolute part scaled by its largest value,
    50-200: it sums over the positions; measured at most 0.02 for F(2x2, 3x3), 0.13 for F(4x4, 3x3)), and within
    ERROR_BOUNDS of the GEMMs' error. On unscaled weights (outputs of scale 100) the forward's F(4x4, 3x3) exceeds the
    tolerance, so float32 takes it only below 'highest' matmul precision (test_dispatch_rule); the weight gradient's
    tolerance scales with its values, and F(3x3, 4x4) serves it at any precision."""
    n, c, size = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, c, size, size, generator=g)
    w = torch.randn(c, c, 3, 3, generator=g) / (9 * c) ** 0.5
    dy = torch.randn(n, c, size, size, generator=g)
    refs = _reference(x, w, None, dy, 1, 1)
    names = ("y", "dx", "dw")
    errors = {}
    for algorithm_run, wgrad_algorithm in ((algorithm, algorithm), ("implicit", "gemm")):
        *products, _ = _products(x, w, None, dy, 1, 1, algorithm_run, wgrad_algorithm)
        for name, ours, ref in zip(names, products, refs):
            error = (ours.double() - ref).abs()
            errors[algorithm_run, name] = error.max().item()
            scale = 1.0 if name != "dw" else ref.abs().max().item()  # the sum over positions: tolerance scaled
            assert (error / (1e-4 * scale + 1e-4 * ref.abs())).max().item() <= 0.25, (name, algorithm_run)
    for name in names:
        assert errors[algorithm, name] <= ERROR_BOUNDS[algorithm] * errors["implicit", name], errors


@contextlib.contextmanager
def _matmul_precision(precision):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _expected(chosen, precision, dtype):
    """The algorithm a forward rule picks: F(4x4)'s tiles in float32 only below 'highest' precision, else F(2x2)'s
    (the weight gradient's F(3x3, 4x4) has no such condition)."""
    if chosen == "winograd_4x4" and precision == "highest" and dtype == torch.float32:
        return "winograd"
    return chosen


# `chosen`: what the rules pick where the 4x4 tiles are allowed (float64, or float32 below 'highest' precision).
@pytest.mark.parametrize("precision, dtype", [("highest", torch.float32), ("high", torch.float32),
                                              ("highest", torch.float64)])
@pytest.mark.parametrize("shape, chosen", [
    ((8, 64, 14, 14, 64), "winograd_4x4"),  # ResNet-like: 392 tiles (2x2), 64 channels
    ((2, 32, 28, 28, 64), "winograd_4x4"),
    ((16, 32, 8, 8, 64), "winograd_4x4"),  # the lanes kernels could serve it (16 images), Winograd's rule comes first
    ((1, 128, 28, 28, 128), "winograd_4x4"),  # 49 tiles (4x4): 334 transformed kernel values per tile
    ((8, 256, 14, 14, 256), "winograd"),  # 128 tiles (4x4): 512 values per tile, F(4x4)'s larger kernel: a tie
    ((8, 16, 14, 14, 16), None),  # too few channels
    # Few tiles, many channels (the tiles as the GEMMs' rows): 49 tiles (2x2) with 128-512 channels, 9 with 256,
    # 98 with 128 each side.
    ((1, 256, 14, 14, 256), "winograd"),
    ((1, 128, 14, 14, 128), "winograd"),
    ((1, 512, 14, 14, 512), "winograd"),
    ((1, 256, 6, 6, 256), "winograd"),
    ((2, 128, 14, 14, 128), "winograd"),
    ((1, 64, 14, 14, 64), None),  # 49 tiles, 64 output channels: fewer than twice the tiles
    ((1, 256, 2, 2, 256), None),  # one tile
    ((1, 512, 4, 4, 512), None),  # 4 tiles with over 256x256 channels
    ((32, 32, 8, 8, 32), None),  # 32 + 32 channels: a tie with the implicit GEMM
])
def test_dispatch_rule(shape, chosen, precision, dtype):
    n, c, size, _, k = shape
    x, w, dy = (torch.randn(s, dtype=dtype) for s in ((n, c, size, size), (k, c, 3, 3), (n, k, size, size)))
    with _matmul_precision(precision), cpu_dispatch.recording() as calls:
        ops.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1)
        ops.conv2d_backward_input(dy, w, [n, c, size, size], [1, 1], [1, 1], [1, 1], 1)
        ops.conv2d(x, w, None, [2, 2], [1, 1], [1, 1], 1)  # strided: never Winograd
    algorithms = [a for _, a, _ in calls]
    if chosen is None:
        assert not any(a.startswith("winograd") for a in algorithms), algorithms
    else:
        expected = _expected(chosen, precision, dtype)
        assert algorithms[:2] == [expected, expected] and not algorithms[2].startswith("winograd"), algorithms


@pytest.mark.parametrize("precision, dtype", [("highest", torch.float32), ("medium", torch.float32),
                                              ("highest", torch.float64)])
@pytest.mark.parametrize("shape, chosen", [
    ((8, 64, 14, 14, 64), "winograd"),  # 14x14 pads to 16x16: 4x4 tiles multiply 0.73 as much, and measured slower
    ((16, 64, 14, 14, 64), "winograd_4x4"),  # ... but faster on runs of tiles (more than twice the output channels)
    ((128, 32, 14, 14, 64), "winograd_4x4"),  # DeepMNIST's third layer
    ((8, 64, 28, 28, 64), "winograd_4x4"),
    ((1, 128, 16, 16, 128), "winograd_4x4"),  # both on the blocks of output channels (few tiles): 0.56 the products
    ((1, 256, 14, 14, 256), "winograd"),  # 49 tiles with many channels
    # 14x14 on the blocks: 4x4 tiles multiply 0.73 as much, more than 2/3 (and whole GEMMs' M, 36 x 256 x 256 sums,
    # would be more than half of what the blocks re-read of V)
    ((2, 256, 14, 14, 256), "winograd"),
    ((1, 64, 14, 14, 64), None),  # 49 tiles, 64 channels: left to the GEMMs
    ((2, 512, 7, 7, 512), None),  # 32 tiles
    ((16, 32, 8, 8, 64), "winograd"),  # ahead of the lanes kernels; its 4x4 tiles would leave the runs for the blocks
    ((1, 64, 28, 28, 64), "winograd"),  # likewise
    ((2, 128, 28, 28, 128), "winograd_4x4"),  # ... unless 128 channels each side
    ((4, 512, 7, 7, 512), "winograd_4x4"),  # on the blocks: no bound on the sums per tile there
    ((1, 256, 28, 28, 256), "winograd_4x4"),
    ((8, 16, 14, 14, 16), None),  # too few channels
    ((32, 32, 8, 8, 32), "winograd_4x4"),  # 32 channels each side: ahead of the lanes kernels too
    ((64, 64, 5, 5, 64), "winograd"),  # 5x5 planes: 4x4 tiles pad them to 8x8, as many products as 2x2 tiles
    # ... but with the GEMMs whole (V outgrowing what the blocks share), 14x14 takes the 4x4 tiles on few tiles too
    ((8, 256, 14, 14, 256), {torch.float32: "winograd_4x4", torch.float64: "winograd"}),  # float64's M: 18 MiB
    ((8, 192, 14, 14, 192), "winograd_4x4"),
    ((8, 128, 14, 14, 128), "winograd_4x4"),
    # on the runs, at most 2/3 the products: up to 131072 sums per tile (73728 here), not 589824 (1024 channels)
    ((32, 512, 7, 7, 512), "winograd_4x4"),
    ((16, 1024, 7, 7, 1024), "winograd"),
])
def test_weight_gradient_dispatch_rule(shape, chosen, precision, dtype):
    n, c, size, _, k = shape
    x, dy = torch.randn(n, c, size, size, dtype=dtype), torch.randn(n, k, size, size, dtype=dtype)
    with _matmul_precision(precision), cpu_dispatch.recording() as calls:
        ops.conv2d_backward_weight(dy, x, [k, c, 3, 3], [1, 1], [1, 1], [1, 1], 1)
        ops.conv2d_backward_weight(dy[:, :, ::2, ::2], x, [k, c, 3, 3], [2, 2], [1, 1], [1, 1], 1)
    (_, first, _), (_, strided, _) = calls
    chosen = chosen[dtype] if isinstance(chosen, dict) else chosen
    assert first == chosen if chosen else not first.startswith("winograd"), first
    assert not strided.startswith("winograd"), strided
