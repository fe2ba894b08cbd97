"""The CPU's batch-in-lanes float32 kernels (csrc/cpu/conv2d_lanes.cpp), taken for batches of a vector's lanes or
more images (16 on AVX-512, 8 on AVX2) with small planes and channel counts: parity with torch's float64 convolution
for full and partial blocks and every hyper-parameter, the fused forward bit for bit our unfused ops, and the fused
backward equal to its composite of backward ops. Every test runs once per ISA with lanes kernels that this machine
has (on others, on the portable ISA, where the GEMM path takes the same shapes)."""

import math

import pytest
import torch
import torch.nn.functional as F

import cnn_ext  # noqa: F401  (registers the ops)
from _support import assert_close
from cnn_ext import cpu_dispatch

ops = torch.ops.cnn_ext
LANES_ISAS = [isa for isa in ("avx2", "avx512") if isa in cpu_dispatch.available_isas()] or ["default"]


@pytest.fixture(autouse=True, params=LANES_ISAS)
def isa(request):
    with cpu_dispatch.forced(isa=request.param):
        yield request.param

# n, c, h, w, k, r, s, stride, padding, dilation
CONFIGS = [
    (16, 1, 28, 28, 10, 5, 5, 1, 0, 1),  # MNIST conv1, one full block
    (17, 10, 12, 12, 20, 5, 5, 1, 0, 1),  # MNIST conv2, a full block and a 1-image block
    (40, 3, 9, 11, 7, 3, 3, 1, 1, 1),
    (33, 4, 10, 8, 13, 3, 2, (2, 1), 1, 1),
    (16, 8, 7, 7, 5, 3, 3, 1, 2, 2),
    (20, 9, 12, 10, 25, 5, 3, 1, (2, 1), 1),
    (40, 12, 6, 6, 16, 1, 1, 1, 0, 1),
    (16, 16, 8, 9, 3, 2, 4, (2, 1), (1, 2), (1, 2)),
    (31, 10, 11, 11, 64, 3, 3, 1, 1, 1),
    (18, 2, 5, 5, 1, 5, 5, 1, 0, 1),  # 1×1 output
    (9, 8, 10, 10, 6, 3, 3, 1, 1, 1),  # AVX2: a full block of 8 and a 1-image block; AVX-512: the GEMMs
]


def _pair(v):
    return list(v) if isinstance(v, tuple) else [v, v]


def _case(config, seed=0):
    n, c, h, w, k, r, s, stride, padding, dilation = config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(k, c, r, s, generator=g)
    bias = torch.randn(k, generator=g)
    return x, weight, bias, (_pair(stride), _pair(padding), _pair(dilation), 1)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "x".join(map(str, c[:7])))
def test_conv_ops_match_torch(config):
    x, w, b, conv = _case(config)
    stride, padding, dilation, _ = conv
    ref = F.conv2d(x.double(), w.double(), b.double(), stride, padding, dilation)
    out = ops.conv2d(x, w, b, *conv)
    assert_close(out.double(), ref, torch.float32, msg="forward")
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grad_x = torch.nn.grad.conv2d_input(x.shape, w.double(), dy.double(), stride, padding, dilation)
    assert_close(ops.conv2d_backward_input(dy, w, list(x.shape), *conv).double(), grad_x, torch.float32,
                 msg="grad_input")
    grad_w = torch.nn.grad.conv2d_weight(x.double(), w.shape, dy.double(), stride, padding, dilation)
    scale = math.sqrt(out.shape[0] * out.shape[2] * out.shape[3])  # wgrad sums N*P*Q products
    assert_close(ops.conv2d_backward_weight(dy, x, list(w.shape), *conv).double(), grad_w, torch.float32,
                 scale=scale, msg="grad_weight")


POOLS = {
    "2x2": ([2, 2], [2, 2], [0, 0], [1, 1], False),
    "3x3s2p1ceil": ([3, 3], [2, 2], [1, 1], [1, 1], True),
    # Later windows start before earlier ones (row kernel 2, dilation 2, padding 1): the conv rows a chunk of pooled
    # rows needs are not simply [first window's start, last window's end).
    "2x3dilated": ([2, 3], [1, 2], [1, 1], [2, 1], True),
}


@pytest.mark.parametrize("pool", POOLS.values(), ids=POOLS.keys())
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[1], CONFIGS[2], CONFIGS[4]], ids=lambda c: f"n{c[0]}c{c[1]}")
def test_fused_forward_is_unfused_bitwise(config, pool):
    x, w, b, conv = _case(config)
    out, idx = ops.conv2d_maxpool_relu(x, w, b, *conv, *pool)
    y = ops.conv2d(x, w, b, *conv)
    pooled, ref_idx = ops.max_pool2d(y, *pool)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(out, torch.relu(pooled))
    kernel, stride, padding, dilation, ceil_mode = pool
    _, torch_idx = F.max_pool2d(y, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
    assert torch.equal(idx, torch_idx)


@pytest.mark.parametrize("pool", POOLS.values(), ids=POOLS.keys())
def test_fused_forward_small_batch_dilated_pool(pool):
    """The same pooling windows through the GEMM path (float64, 2 images)."""
    x, w, b, conv = _case(CONFIGS[2])
    x, w, b = x[:2].double(), w.double(), b.double()
    out, idx = ops.conv2d_maxpool_relu(x, w, b, *conv, *pool)
    pooled, ref_idx = ops.max_pool2d(ops.conv2d(x, w, b, *conv), *pool)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(out, torch.relu(pooled))


def _composite(grad_output, out, idx, x, w, conv, pool):
    grad_conv = ops.conv2d_maxpool_relu_backward_pool(grad_output, out, idx, x, w, *conv, *pool)
    return (ops.conv2d_backward_input(grad_conv, w, list(x.shape), *conv),
            ops.conv2d_backward_weight(grad_conv, x, list(w.shape), *conv),
            ops.conv2d_backward_bias(grad_conv))


@pytest.mark.parametrize("mask", [[True, True, True], [False, True, True], [True, False, False], [False, False, True]])
@pytest.mark.parametrize("pool", POOLS.values(), ids=POOLS.keys())
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[1], CONFIGS[2], CONFIGS[4]], ids=lambda c: f"n{c[0]}c{c[1]}")
def test_fused_backward_matches_composite(config, pool, mask):
    x, w, b, conv = _case(config)
    out, idx = ops.conv2d_maxpool_relu(x, w, b, *conv, *pool)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    got = ops.conv2d_maxpool_relu_backward(grad_output, out, idx, x, w, *conv, *pool, mask)
    want = _composite(grad_output, out, idx, x, w, conv, pool)
    scale = math.sqrt(x.shape[0] * out.shape[2] * out.shape[3] * 4)
    for name, wanted, g, ref in zip(("input", "weight", "bias"), mask, got, want):
        if wanted:
            assert_close(g, ref, torch.float32, scale=scale, msg=f"grad_{name}")
        else:
            assert g.numel() == 0, name


def test_fused_backward_nan_and_unused_windows():
    """NaN outputs pass gradient (ReLU keeps NaN), zero outputs block it, as in the composite."""
    x, w, b, conv = _case(CONFIGS[1])
    x[3, 2, 4, 5] = float("nan")
    pool = POOLS["2x2"]
    out, idx = ops.conv2d_maxpool_relu(x, w, b, *conv, *pool)
    assert torch.isnan(out).any() and (out == 0).any()
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    got = ops.conv2d_maxpool_relu_backward(grad_output, out, idx, x, w, *conv, *pool, [True, True, True])
    want = _composite(grad_output, out, idx, x, w, conv, pool)
    for g, ref in zip(got, want):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-3, equal_nan=True)


def test_fused_backward_foreign_indices():
    """Indices the forward could not have produced: an in-plane index outside its window is placed where it points
    (the general path takes over), an out-of-plane one is reported, naming the indices."""
    x, w, b, conv = _case(CONFIGS[1])
    pool = POOLS["2x2"]
    out, idx = ops.conv2d_maxpool_relu(x, w, b, *conv, *pool)
    grad_output = torch.ones_like(out)
    out = out.abs() + 1  # every output passes gradient
    idx = idx.clone()
    idx[5, 3, 1, 1] = 0  # a position of the plane, but not of that window
    got = ops.conv2d_maxpool_relu_backward(grad_output, out, idx, x, w, *conv, *pool, [True, True, True])
    for g, ref in zip(got, _composite(grad_output, out, idx, x, w, conv, pool)):
        assert_close(g, ref, torch.float32, scale=30)
    idx[5, 3, 1, 1] = 2**40  # would alias a valid position if truncated to 32 bits
    with pytest.raises(ValueError, match=r"indices\[5, 3, 1, 1\]"):
        ops.conv2d_maxpool_relu_backward(grad_output, out, idx, x, w, *conv, *pool, [False, True, False])


def test_fused_autograd_matches_torch():
    """The MNIST classifier's layer shapes with a 20-image batch, through autograd, against torch in float64."""
    for config in (CONFIGS[0], CONFIGS[1]):
        x, w, b, conv = _case(config)
        x, w, b = (t.clone().requires_grad_(True) for t in (x, w, b))
        out, _ = ops.conv2d_maxpool_relu(x, w, b, *conv, *POOLS["2x2"])
        grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
        got = torch.autograd.grad(out, (x, w, b), grad_output)
        xd, wd, bd = (t.detach().double().requires_grad_(True) for t in (x, w, b))
        ref_out = torch.relu(F.max_pool2d(F.conv2d(xd, wd, bd), 2))
        want = torch.autograd.grad(ref_out, (xd, wd, bd), grad_output.double())
        assert_close(out.double(), ref_out, torch.float32)
        for g, ref in zip(got, want):
            assert_close(g.double(), ref, torch.float32, scale=math.sqrt(x.shape[0] * 576))


def test_lanes_results_are_reproducible():
    """Same inputs, same bits: the kernels' reductions run in a fixed order."""
    x, w, b, conv = _case(CONFIGS[1])
    out, idx = ops.conv2d_maxpool_relu(x, w, b, *conv, *POOLS["2x2"])
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))

    def run():
        return (ops.conv2d(x, w, b, *conv), ops.conv2d_backward_weight(ops.conv2d(x, w, b, *conv), x, list(w.shape),
                                                                       *conv),
                *ops.conv2d_maxpool_relu_backward(grad_output, out, idx, x, w, *conv, *POOLS["2x2"],
                                                  [True, True, True]))

    for a, b_ in zip(run(), run()):
        assert torch.equal(a, b_)


def test_lanes_results_with_one_thread_and_several():
    """fprop and the fused forward do not depend on the thread count (each output has one fixed sum); the
    gradients' split of the batch does, within float32 rounding."""
    x, w, b, conv = _case(CONFIGS[1], seed=6)
    pool = POOLS["2x2"]
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, max(2, before)):
            torch.set_num_threads(threads)
            out, idx = ops.conv2d_maxpool_relu(x, w, b, *conv, *pool)
            grad_output = torch.ones_like(out)
            results.append((ops.conv2d(x, w, b, *conv), out, idx,
                            *ops.conv2d_maxpool_relu_backward(grad_output, out, idx, x, w, *conv, *pool,
                                                              [True, True, True])))
    finally:
        torch.set_num_threads(before)
    one, several = results
    for a, b_ in zip(one[:3], several[:3]):
        assert torch.equal(a, b_)
    for a, b_ in zip(one[3:], several[3:]):
        assert_close(a, b_, torch.float32, scale=30)


@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[-1]], ids=lambda c: f"n{c[0]}")
def test_lanes_serve_full_blocks(config, isa):
    """Which kernels ran (the dispatch record): lanes on an ISA with lanes kernels once the batch fills a block."""
    x, w, b, conv = _case(config)
    with cpu_dispatch.recording() as calls:
        out, idx = ops.conv2d_maxpool_relu(x, w, b, *conv, *POOLS["2x2"])
        ops.conv2d_maxpool_relu_backward(torch.ones_like(out), out, idx, x, w, *conv, *POOLS["2x2"],
                                         [True, True, True])
    lanes = {"avx2": 8, "avx512": 16}.get(isa)
    expected = "lanes" if lanes is not None and x.shape[0] >= lanes else None
    for direction, algorithm, used_isa in calls:
        assert used_isa == isa
        if expected is not None:
            assert algorithm == expected, (direction, algorithm)
        else:
            assert algorithm != "lanes", (direction, algorithm)
    assert {d for d, _, _ in calls} >= {"fused_forward", "fused_backward"}
