"""CUDA-only checks: CPU-vs-CUDA agreement, multi-GPU device guards, streams and CUDA graphs. Skipped, with the
reason, where no GPU (or no CUDA build) is present; the device-parametrised suites (and test_low_precision.py) cover
the rest of the CUDA semantics, on a GPU and on the emulator."""

import copy

import pytest
import torch
import torch.nn.functional as F

import cnn_ext
from _support import cuda_kernels_available, grads

ops = torch.ops.cnn_ext
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cuda_kernels_available(),
                                                  reason="no CUDA GPU visible or cnn_ext built without CUDA kernels")]

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


def _every_op(x, w, b, x_split, w_split):
    """Every cnn_ext operator once (the conv GEMMs with and without split-K, the direct kernels), on the current
    stream."""
    conv = ([1, 1], [1, 1], [1, 1], 1)
    pool = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    y = ops.conv2d(x, w, b, *conv)
    pooled, idx = ops.max_pool2d(y, *pool)
    avg = ops.avg_pool2d(y, [3, 3], [2, 2], [1, 1], True, False, None)
    fused, fused_idx = ops.conv2d_maxpool_relu(x, w, b, *conv, *pool)
    y_split = ops.conv2d(x_split, w_split, None, *conv)
    depthwise = (w[:, :1].contiguous(), [1, 1], [1, 1], [1, 1], x.shape[1])  # direct kernels
    y_depthwise = ops.conv2d(x, depthwise[0], None, *depthwise[1:])
    return [y, pooled, idx, avg, fused, fused_idx, y_split, y_depthwise,
            ops.conv2d_backward_input(y_depthwise, depthwise[0], list(x.shape), *depthwise[1:]),
            ops.conv2d_backward_weight(y_depthwise, x, list(depthwise[0].shape), *depthwise[1:]),
            ops.conv2d_backward_input(y, w, list(x.shape), *conv),
            ops.conv2d_backward_weight(y, x, list(w.shape), *conv),
            ops.conv2d_backward_bias(y),
            ops.max_pool2d_backward(pooled, idx, list(y.shape), *pool),
            ops.avg_pool2d_backward(avg, list(y.shape), [3, 3], [2, 2], [1, 1], True, False, None),
            *ops.conv2d_maxpool_relu_backward(fused, fused, fused_idx, x, w, *conv, *pool, [True, True, True]),
            ops.conv2d_backward_input(y_split, w_split, list(x_split.shape), *conv),
            ops.conv2d_backward_weight(y_split, x_split, list(w_split.shape), *conv)]


def test_every_op_captures_into_a_cuda_graph_on_a_side_stream():
    """torch.cuda.graph captures on a side stream: a kernel launched on another stream, or anything that waits for
    the device (the max-pool backward's index check must not), breaks the capture. Replays then recompute every
    result for new inputs, bit for bit as eager calls do."""
    shapes = [(8, 3, 16, 16), (6, 3, 3, 3), (6,), (1, 32, 8, 8), (32, 32, 3, 3)]
    static = [torch.randn(s, device="cuda") for s in shapes]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch's CUDA-graph notes advise
        _every_op(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _every_op(*static)
    for _ in range(2):
        fresh = [torch.randn(s, device="cuda") for s in shapes]
        for target, source in zip(static, fresh):
            target.copy_(source)
        graph.replay()
        for got, want in zip(captured, _every_op(*fresh)):
            assert torch.equal(got, want)


def test_graphed_training_step_matches_eager_on_synthetic_data():
    """The trainer's CUDA-graph step (warm-up on a side stream, capture, replays, an eager partial batch) against
    its eager step, from the same weights on the same synthetic batches: same losses and weights (no MNIST)."""
    pytest.importorskip("torchvision", reason="cnn_ext.app.data reads MNIST with torchvision's readers")
    from cnn_ext.app.models import MNISTClassifier
    from cnn_ext.app.steps import EagerStep, GraphedStep

    torch.manual_seed(0)
    eager_model = MNISTClassifier().cuda()
    graphed_model = copy.deepcopy(eager_model)
    images = torch.randn(600, 1, 28, 28, device="cuda")
    labels = torch.randint(0, 10, (600,), device="cuda")
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.5) for m in (eager_model, graphed_model)]
    eager = EagerStep(eager_model, optimizers[0])
    graphed = GraphedStep(graphed_model, optimizers[1], 64, images, labels)
    for start in range(0, 600, 64):  # 9 full batches (3 warm-up, a capture, replays) and a partial one of 24
        x, y = images[start:start + 64], labels[start:start + 64]
        (eager_loss, eager_correct), (graphed_loss, graphed_correct) = eager(x, y), graphed(x, y)
        torch.testing.assert_close(graphed_loss, eager_loss, rtol=1e-5, atol=1e-6)
        assert graphed_correct.item() == eager_correct.item()
    assert graphed.graph is not None
    for (name, a), b in zip(eager_model.named_parameters(), graphed_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_backward_through_autograd_never_waits_for_the_gpu():
    """Max-pool indices saved by autograd come from our own forward, so their check (a read-back that waits for the
    stream) is skipped there: a training step's backward must not synchronise. A direct call of the backward
    operator still checks what it is given."""
    x = torch.randn(8, 3, 12, 12, device="cuda", requires_grad=True)
    w = torch.randn(5, 3, 3, 3, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = cnn_ext.functional.max_pool2d(cnn_ext.functional.conv2d_maxpool_relu(x, w, padding=1), 2)
        y.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    out, idx = ops.max_pool2d(x.detach(), [2, 2], [2, 2], [0, 0], [1, 1], False)
    bad = idx.clone()
    bad.view(-1)[5] = 10_000
    with pytest.raises(ValueError, match=r"indices\[0, 0, 0, 5\] = 10000 is not a position"):
        ops.max_pool2d_backward(torch.ones_like(out), bad, list(x.shape), [2, 2], [2, 2], [0, 0], [1, 1], False)
