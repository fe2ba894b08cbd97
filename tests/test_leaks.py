"""No leaks: memory stays flat over thousands of forward+backward calls of every op (and of calls that raise), and
training is reproducible: two identical runs of a tiny cnn_ext CNN end with bitwise-identical weights."""

import gc
import os

import pytest
import torch
import torch.nn.functional as F

import cnn_ext
from _support import DEVICES, needs_gpu

fn = cnn_ext.functional
ops = torch.ops.cnn_ext

ITERATIONS = 2000
WARMUP = 100
# Every tensor an iteration below makes is at least 36 KB (inputs are 1x2x96x96 float64, 144 KB; pooled outputs
# 1x2x48x48), so leaking even one per call grows memory by at least 2000 * 36 KB = 70 MB: far above this slack, which
# only absorbs allocator noise. Channels and kernels are tiny, so the memory is large but the arithmetic cheap.
RSS_SLACK = 20 * 2**20


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors():
    # issubclass(type(o)) rather than isinstance(o): isinstance would touch lazy module proxies (deprecation warnings).
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def _step_conv(x, w, b):
    out = fn.conv2d(x, w, b, stride=1, padding=1, groups=2)  # depthwise, channel multiplier 2
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), torch.ones_like(out))
    return out, gx, gw, gb


def _step_max_pool(x, w, b):
    out = fn.max_pool2d(x, 3, stride=2, padding=1, dilation=1, ceil_mode=True)
    return out, torch.autograd.grad(out, x, torch.ones_like(out))[0]


def _step_avg_pool(x, w, b):
    out = fn.avg_pool2d(x, 3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
    return out, torch.autograd.grad(out, x, torch.ones_like(out))[0]


def _step_raising(x, w, b):
    """Calls that fail their checks, some only after their output is allocated (an out-of-range max-pool index is
    found while scattering): the error path must free everything too."""
    out, idx = ops.max_pool2d(x.detach(), [2, 2], [2, 2], [0, 0], [1, 1], False)
    bad = idx.clone()
    bad.view(-1)[-1] = x.shape[2] * x.shape[3]
    for call in (lambda: ops.max_pool2d_backward(out, bad, list(x.shape), [2, 2], [2, 2], [0, 0], [1, 1], False),
                 lambda: fn.conv2d(x, w[:, :1], b),
                 lambda: fn.avg_pool2d(x, 2, divisor_override=0)):
        try:
            call()
        except (ValueError, TypeError, RuntimeError):
            pass
        else:
            raise AssertionError("an illegal call did not raise")
    return out, idx


STEPS = {"conv2d": _step_conv, "max_pool2d": _step_max_pool, "avg_pool2d": _step_avg_pool, "raising": _step_raising}


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 96, 96, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    w = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    b = torch.randn(4, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    return x, w, b


def _run(step, inputs, iterations):
    for _ in range(iterations):
        step(*inputs)


@pytest.fixture
def one_thread():
    """On a busy 2-core machine every parallel region costs milliseconds of thread hand-off, which would make
    thousands of calls take minutes. Memory, not parallelism, is measured here (parity with threads is tested
    elsewhere), so the CPU loops run on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("op", list(STEPS))
def test_cpu_memory_stays_flat(op, one_thread):
    step, inputs = STEPS[op], _inputs("cpu")
    _run(step, inputs, WARMUP)  # thread pools, allocator arenas and autograd caches reach their steady state
    gc.collect()
    rss, tensors = _rss_bytes(), _live_tensors()
    _run(step, inputs, ITERATIONS)
    gc.collect()
    grown = _rss_bytes() - rss
    assert grown < RSS_SLACK, f"RSS grew by {grown / 2**20:.1f} MB over {ITERATIONS} iterations of {op}"
    # <=, not ==: tensors cached by earlier tests (torch.export, say) may be collected meanwhile.
    assert _live_tensors() <= tensors, "Python-visible tensors were left alive"


@needs_gpu
@pytest.mark.parametrize("op", list(STEPS))
def test_cuda_memory_stays_flat(op):
    step, inputs = STEPS[op], _inputs("cuda")
    _run(step, inputs, WARMUP)
    torch.cuda.synchronize()
    gc.collect()
    allocated = torch.cuda.memory_allocated()
    _run(step, inputs, ITERATIONS)
    torch.cuda.synchronize()
    gc.collect()
    # The caching allocator's count of live bytes is exact: after the loop it must be back where it started.
    assert torch.cuda.memory_allocated() == allocated


# ---------------------------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------------------------


def _train(device, steps=5):
    """A few SGD steps of a tiny CNN using every cnn_ext module; returns its final weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        cnn_ext.nn.Conv2d(2, 6, 3, padding=1),
        torch.nn.ReLU(),
        cnn_ext.nn.MaxPool2d(2, ceil_mode=True),
        cnn_ext.nn.Conv2d(6, 6, (3, 2), padding="same", groups=3, bias=False),  # grouped, non-square, 'same'
        torch.nn.ReLU(),
        cnn_ext.nn.AvgPool2d(2, count_include_pad=False, padding=1),
        torch.nn.Flatten(),
        torch.nn.LazyLinear(3),
    ).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 2, 11, 13, generator=g).to(device)
    y = torch.randint(0, 3, (16,), generator=g).to(device)
    model(x)  # materialise the lazy layer before the optimizer sees the parameters
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("device", DEVICES)
def test_training_is_bitwise_reproducible(device):
    first, second = _train(device), _train(device)
    initial = _train(device, steps=0)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between two identical runs"
    # Guard against a vacuous pass: training did change the weights.
    assert any(not torch.equal(first[name], initial[name]) for name in first)
