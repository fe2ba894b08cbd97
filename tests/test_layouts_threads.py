"""Gradients arriving in any memory layout, outputs' layout, and thread counts: 1, 2, 3 and more threads than work."""

import threading

import pytest
import torch
import torch.nn.functional as F

import cnn_ext
from _support import DEVICES, assert_close, grads, make_tensor

fn = cnn_ext.functional


def _ops(device):
    """(name, ours, torch's, inputs) for every differentiable op."""
    g = torch.Generator().manual_seed(0)
    x = make_tensor((3, 4, 10, 9), torch.float64, device, generator=g, requires_grad=True)
    w = make_tensor((6, 4, 3, 3), torch.float64, device, generator=g, requires_grad=True)
    b = make_tensor((6,), torch.float64, device, generator=g, requires_grad=True)
    return [
        ("conv2d", lambda: fn.conv2d(x, w, b, padding=1), lambda: F.conv2d(x, w, b, padding=1), [x, w, b]),
        ("max_pool2d", lambda: fn.max_pool2d(x, 3, 2, 1, ceil_mode=True),
         lambda: F.max_pool2d(x, 3, 2, 1, ceil_mode=True), [x]),
        ("avg_pool2d", lambda: fn.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
         lambda: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False), [x]),
        ("conv2d_maxpool_relu", lambda: fn.conv2d_maxpool_relu(x, w, b, padding=1, pool_kernel_size=2),
         lambda: torch.relu(F.max_pool2d(F.conv2d(x, w, b, padding=1), 2)), [x, w, b]),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("op", ["conv2d", "max_pool2d", "avg_pool2d", "conv2d_maxpool_relu"])
def test_grad_output_in_any_layout(op, layout, device):
    """A grad_output that is channels_last or a non-contiguous view gives the same gradients as a contiguous one."""
    name, ours, theirs, inputs = next(case for case in _ops(device) if case[0] == op)
    out, ref = ours(), theirs()
    grad_out = make_tensor(ref.shape, torch.float64, device, layout, torch.Generator().manual_seed(1))
    assert not grad_out.is_contiguous()
    for got, want in zip(grads(out, inputs, grad_out), grads(ref, inputs, grad_out.contiguous())):
        assert_close(got, want, torch.float64)


@pytest.mark.parametrize("algorithm", ["winograd", "winograd_4x4", "gemm"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_weight_gradient_reads_any_layout(layout, algorithm):
    """The weight gradients that compute on channels-last copies of the input and dY (Winograd's, the GEMM's): from
    NCHW through our own blocked transpose (odd channel and position counts: its 8x8 blocks' edges), from anything
    else through torch's copy."""
    g = torch.Generator().manual_seed(3)
    x = make_tensor((3, 13, 9, 11), torch.float64, "cpu", layout, g)
    dy = make_tensor((3, 10, 9, 11), torch.float64, "cpu", layout, g)
    args = ([1, 1], [1, 1], [1, 1], 1)
    with cnn_ext.cpu_dispatch.forced(wgrad=algorithm), cnn_ext.cpu_dispatch.recording() as calls:
        got = torch.ops.cnn_ext.conv2d_backward_weight(dy, x, [10, 13, 3, 3], *args)
    assert calls == [("wgrad", algorithm, cnn_ext.cpu_dispatch.capability())]
    want = torch.ops.aten.convolution_backward(dy, x, torch.empty(10, 13, 3, 3, dtype=torch.float64), None, *args[:3],
                                               False, [0, 0], 1, [False, True, False])[1]
    assert_close(got, want, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_outputs_are_nchw_whatever_the_input_layout(device):
    """Deliberately unlike torch, whose outputs follow a channels_last input: every cnn_ext kernel computes in NCHW
    (and reads a channels_last input through one copy to NCHW), so NCHW outputs spare a channels_last model converted
    to our layers a copy per layer each way. The values are torch's."""
    x = make_tensor((2, 4, 9, 9), torch.float64, device, "channels_last")
    w = make_tensor((5, 4, 3, 3), torch.float64, device, "channels_last")
    for ours, theirs in [(fn.conv2d(x, w, padding=1), F.conv2d(x, w, padding=1)),
                         (fn.max_pool2d(x, 2), F.max_pool2d(x, 2)), (fn.avg_pool2d(x, 2), F.avg_pool2d(x, 2)),
                         (fn.conv2d_maxpool_relu(x, w), torch.relu(F.max_pool2d(F.conv2d(x, w), 2)))]:
        # torch's CPU kernels follow the input's layout; on CUDA some (cuDNN's float64 convolution) answer in NCHW.
        assert theirs.is_contiguous(memory_format=torch.channels_last) or x.is_cuda
        assert ours.is_contiguous()
        assert_close(ours, theirs, torch.float64)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _everything(shapes, functions):
    """Forward and every gradient of each op (functions: conv, max pool, avg pool, fused) on each (x shape, weight
    shape), float32 (the batch-in-lanes kernels take the 17-image shape)."""
    conv, max_pool, avg_pool, fused = functions
    results = []
    for x_shape, w_shape in shapes:
        g = torch.Generator().manual_seed(2)
        x = torch.randn(x_shape, generator=g).requires_grad_()
        w = torch.randn(w_shape, generator=g).requires_grad_()
        b = torch.randn(w_shape[0], generator=g).requires_grad_()
        pad = w_shape[2] // 2
        for out, inputs in ((conv(x, w, b, padding=pad), [x, w, b]), (max_pool(x, 2, ceil_mode=True), [x]),
                            (avg_pool(x, 2), [x]), (fused(x, w, b, pad), [x, w, b])):
            grad_out = torch.randn(out.shape, generator=g)
            results.append([out.detach()] + grads(out, inputs, grad_out))
    return results


OURS = (fn.conv2d, fn.max_pool2d, fn.avg_pool2d, lambda x, w, b, pad: fn.conv2d_maxpool_relu(x, w, b, padding=pad))
TORCH = (F.conv2d, F.max_pool2d, F.avg_pool2d,
         lambda x, w, b, pad: torch.relu(F.max_pool2d(F.conv2d(x, w, b, padding=pad), 2)))
SHAPES = [((17, 3, 12, 12), (8, 3, 3, 3)),   # batch-in-lanes
          ((2, 6, 11, 9), (40, 6, 3, 3)),    # GEMM paths
          ((1, 1, 3, 3), (1, 1, 3, 3))]      # one output row, one image: fewer work items than threads


def test_results_for_1_2_and_3_threads(threads):
    """With 1, 2 and 3 threads (3 on this 2-core machine: more threads than cores, and than work items for the
    smallest shape) every result matches torch; everything but the weight and bias gradients (whose reductions split
    by thread count) is bitwise the same for every count."""
    runs = {}
    for count in (1, 2, 3):
        threads(count)
        runs[count] = _everything(SHAPES, OURS)
    threads(1)
    reference = _everything(SHAPES, TORCH)
    for count, results in runs.items():
        for got, want in zip(results, reference):
            for a, e in zip(got, want):
                assert_close(a, e, torch.float32, scale=max(1.0, e.abs().max().item() / 10))
    for one, three in zip(runs[1], runs[3]):
        assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])  # outputs and input gradients


def test_in_place_1x1_items_for_1_2_and_3_threads(threads):
    """A 1x1, stride-1, unpadded convolution's forward and input gradient read their source planes in place; the
    rows per item follow the thread count and keep items on whole cache lines where the planes are whole lines
    (56 and 28 columns; not 14). Whatever the split, the results are bitwise the same, and torch's within
    tolerance."""
    g = torch.Generator().manual_seed(5)
    for n, c, k, size in ((1, 32, 24, 56), (3, 40, 16, 28), (2, 24, 40, 14), (1, 8, 8, 28)):
        x, w = torch.randn(n, c, size, size, generator=g), torch.randn(k, c, 1, 1, generator=g)
        dy = torch.randn(n, k, size, size, generator=g)
        args = ([1, 1], [0, 0], [1, 1], 1)
        runs = []
        for count in (1, 2, 3):
            threads(count)
            runs.append((torch.ops.cnn_ext.conv2d(x, w, None, *args),
                         torch.ops.cnn_ext.conv2d_backward_input(dy, w, list(x.shape), *args)))
        threads(1)
        dx = torch.ops.aten.convolution_backward(dy, x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                                 [True, False, False])[0]
        for y, d in runs:
            assert torch.equal(y, runs[0][0]) and torch.equal(d, runs[0][1]), (n, c, k, size)
        assert_close(runs[0][0], F.conv2d(x, w), torch.float32)
        assert_close(runs[0][1], dx, torch.float32)


# Shapes whose calls take the kernels that keep scratch from call to call (csrc/cpu/scratch.h): Winograd (all three
# directions), the implicit products and dcol, the transposed, dot-tile and GEMM weight gradients.
SCRATCH_CASES = [((2, 48, 28, 28), (48, 48, 3, 3), 1, 1),   # Winograd, 4x4 tiles (float64 takes them)
                 ((1, 256, 14, 14), (256, 256, 3, 3), 1, 1),  # 2x2 tiles on 49 tiles: output channels split
                 ((1, 3, 40, 40), (32, 3, 7, 7), 2, 3),     # implicit (stride phases), transposed wgrad
                 ((1, 64, 7, 7), (64, 64, 3, 3), 1, 0),     # implicit, dcol, GEMM wgrad
                 ((2, 8, 12, 12), (16, 8, 3, 3), 1, 1),     # dot-tile wgrad
                 ((2, 48, 9, 9), (32, 48, 1, 1), 1, 0)]     # 1x1: the input read in place


def _conv_all(x, w, stride, pad, dy):
    ops = torch.ops.cnn_ext
    args = ([stride] * 2, [pad] * 2, [1, 1], 1)
    return (ops.conv2d(x, w, None, *args), ops.conv2d_backward_input(dy, w, list(x.shape), *args),
            ops.conv2d_backward_weight(dy, x, list(w.shape), *args))


def _conv_reference(x, w, stride, pad, dy):
    args = ([stride] * 2, [pad] * 2, [1, 1])
    dx, dw, _ = torch.ops.aten.convolution_backward(dy, x, w, None, *args, False, [0, 0], 1, [True, True, False])
    return F.conv2d(x, w, None, *args), dx, dw


def test_scratch_kept_between_calls_does_not_leak_values():
    """Scratch outlives a call: a call on NaN and infinite inputs twice as large, whose values fill the buffers past
    where the next call writes, then a call on finite inputs (reading padding and slack there) still matches torch
    exactly in float64, for every kernel."""
    g = torch.Generator().manual_seed(3)
    for (n, c, h, w_), ws, stride, pad in SCRATCH_CASES:
        x = torch.randn((n, c, h, w_), generator=g, dtype=torch.float64)
        w = torch.randn(ws, generator=g, dtype=torch.float64)
        dy = torch.randn(F.conv2d(x, w, None, stride, pad).shape, generator=g, dtype=torch.float64)
        big_x = torch.full((n, c, 2 * h, 2 * w_), float("nan"), dtype=torch.float64)
        big_x[:, :, ::2] = float("inf")
        big_dy = torch.full(F.conv2d(big_x, w, None, stride, pad).shape, float("nan"), dtype=torch.float64)
        _conv_all(big_x, w.clone().fill_(float("nan")), stride, pad, big_dy)
        for got, want in zip(_conv_all(x, w, stride, pad, dy), _conv_reference(x, w, stride, pad, dy)):
            assert torch.allclose(got, want, rtol=1e-9, atol=1e-9), ((n, c, h, w_), ws)


def test_concurrent_callers_keep_their_own_scratch():
    """Python threads calling the kernels at once (each calling thread has its own scratch) all get torch's
    results."""
    g = torch.Generator().manual_seed(4)
    cases = []
    for xs, ws, stride, pad in SCRATCH_CASES:
        x = torch.randn(xs, generator=g, dtype=torch.float64)
        w = torch.randn(ws, generator=g, dtype=torch.float64)
        dy = torch.randn(F.conv2d(x, w, None, stride, pad).shape, generator=g, dtype=torch.float64)
        cases.append(((x, w, stride, pad, dy), _conv_reference(x, w, stride, pad, dy)))
    failures = []

    def worker(first):
        for i in range(12):
            inputs, want = cases[(first + i) % len(cases)]
            got = _conv_all(*inputs)
            if not all(torch.allclose(a, e, rtol=1e-9, atol=1e-9) for a, e in zip(got, want)):
                failures.append((first, i))

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(3)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not failures
