"""max_pool2d and avg_pool2d parity with torch.nn.functional: outputs, indices and input gradients."""

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

import cnn_ext
from _support import (DEVICES, LAYOUTS, assert_close, check_avg_pool2d, check_max_pool2d, cpu_kernels_serve,
                      make_tensor)

_pair = torch.nn.modules.utils._pair


def _pool_cases(dilations, extra):
    """Pooling configurations: every kernel/stride/padding/dilation/ceil_mode value on its own, then a fixed
    random sample of combinations. `extra` adds op-specific fields (lists of values)."""
    variations = {
        "kernel": [1, 2, 3, 4, 5, (2, 3), (5, 1)],
        "stride": [None, 1, 2, 3, (1, 2)],
        "padding": [0, 1, 2, (0, 1)],
        "dilation": dilations,
        "ceil_mode": [False, True],
        "nchw": [(2, 3, 9, 11), (1, 2, 8, 8), (3, 1, 13, 7), (2, 2, 5, 5)],
        **extra,
    }
    base = {name: values[0] for name, values in variations.items()}
    base.update(kernel=3, padding=1, nchw=(2, 3, 9, 11))
    cases = [dict(base, **{name: v}) for name, values in variations.items() for v in values]
    product = list(itertools.product(*variations.values()))
    random.Random(0).shuffle(product)
    cases += [dict(zip(variations, values)) for values in product[:80]]
    return [c for c in cases if _valid(c)]


def _valid(case):
    """torch's rules: padding at most half the kernel, and at least one output pixel."""
    k, p, d = _pair(case["kernel"]), _pair(case["padding"]), _pair(case.get("dilation", 1))
    s = k if case["stride"] is None else _pair(case["stride"])
    if any(pi > ki // 2 for pi, ki in zip(p, k)):
        return False
    for size, ki, si, pi, di in zip(case["nchw"][2:], k, s, p, d):
        span = size + 2 * pi - di * (ki - 1) - 1
        if span < 0:
            return False
        if case["ceil_mode"]:
            out = -(-span // si) + 1
            if (out - 1) * si >= size + pi:
                out -= 1
        else:
            out = span // si + 1
        # A window that lies wholly in the padding has no defined index in torch (it returns an arbitrary one);
        # that case is covered by test_max_pool2d_window_in_padding instead.
        for o in range(out):
            if not any(0 <= o * si - pi + j * di < size for j in range(ki)):
                return False
    return True


MAX_CASES = _pool_cases([1, 2, 3, (1, 2)], {})
AVG_CASES = _pool_cases([1], {"count_include_pad": [True, False], "divisor_override": [None, 1, 3]})


def _case_id(case):
    return "_".join(f"{k}{v}" for k, v in case.items()).replace(" ", "")


def _input(case, dtype, device, layout="contiguous", seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    x = make_tensor(case["nchw"], dtype, device, layout, g)
    if ties:  # few distinct values, so windows hold equal maxima
        x = x.mul(1.5).round().clamp(-2, 2)
    return x.detach().requires_grad_(True)


def run_max_pool_parity(case, dtype, device, layout="contiguous", ties=False):
    check_max_pool2d(_input(case, dtype, device, layout, ties=ties), case, dtype, torch.Generator().manual_seed(1))


def run_avg_pool_parity(case, dtype, device, layout="contiguous"):
    check_avg_pool2d(_input(case, dtype, device, layout), case, dtype, torch.Generator().manual_seed(1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", MAX_CASES, ids=_case_id)
def test_max_pool2d_matches_torch(case, dtype, device):
    run_max_pool_parity(case, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", AVG_CASES, ids=_case_id)
def test_avg_pool2d_matches_torch(case, dtype, device):
    run_avg_pool_parity(case, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", MAX_CASES[:24], ids=_case_id)
def test_max_pool2d_ties_pick_first_in_window(case, device):
    run_max_pool_parity(case, torch.float32, device, ties=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pool_memory_layouts(layout, device):
    case = dict(kernel=3, stride=2, padding=1, dilation=1, ceil_mode=True, nchw=(2, 3, 9, 11))
    run_max_pool_parity(case, torch.float64, device, layout)
    run_avg_pool_parity(dict(case, count_include_pad=False, divisor_override=None), torch.float64, device, layout)


@pytest.mark.parametrize("device", DEVICES)
def test_max_pool2d_propagates_nan(device):
    x = torch.randn(2, 3, 8, 8, device=device)
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, 7, 7] = float("nan")
    out, idx = cnn_ext.functional.max_pool2d(x, 3, 2, 1, return_indices=True)
    ref, ref_idx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert torch.equal(idx, ref_idx)
    assert out.isnan().sum() == ref.isnan().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_max_pool2d_window_in_padding(device):
    """A dilated window can fall wholly on padding. Its output is -inf as in torch; torch's index there is
    arbitrary, ours is -1, and backward gives such windows no gradient instead of writing somewhere wrong."""
    x = torch.randn(1, 1, 2, 2, device=device, requires_grad=True)
    out, idx = cnn_ext.functional.max_pool2d(x, 2, stride=1, padding=1, dilation=3, return_indices=True)
    ref = F.max_pool2d(x, 2, stride=1, padding=1, dilation=3)
    assert torch.equal(out, ref)
    assert (idx[out == float("-inf")] == -1).all()
    out[out.isfinite()].sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_pool_unbatched_and_mnist_shapes(device):
    x = torch.randn(10, 24, 24, device=device)
    assert_close(cnn_ext.functional.max_pool2d(x, 2), F.max_pool2d(x, 2), torch.float32)
    assert_close(cnn_ext.functional.avg_pool2d(x, 2), F.avg_pool2d(x, 2), torch.float32)
    for shape in ((128, 10, 24, 24), (128, 20, 8, 8)):
        case = dict(kernel=2, stride=None, padding=0, dilation=1, ceil_mode=False, nchw=shape)
        run_max_pool_parity(case, torch.float32, device)
        run_avg_pool_parity(dict(case, count_include_pad=True, divisor_override=None), torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
def test_pool_empty_batch(device):
    x = torch.randn(0, 3, 8, 8, device=device, requires_grad=True)
    out = cnn_ext.functional.max_pool2d(x, 2) + cnn_ext.functional.avg_pool2d(x, 2)
    assert out.shape == (0, 3, 4, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pool", [(2, 2, False), (3, 3, True), ((2, 5), (2, 5), False), (3, 2, True)],
                         ids=["2x2", "3x3ceil", "2x5", "3s2ceil"])
def test_max_pool2d_backward_any_indices(device, pool):
    """The backward adds each output's gradient at its index, whatever the forward would have said: repeated
    indices and -1 (no gradient) too, against a scatter-add reference; a -0.0 gradient gives +0.0, as adding to zero
    does. An in-plane index outside its own window: the CPU adds it there, as ATen's CPU kernel does; CUDA's
    backward gathers, each input
    position from the windows covering it, so such an index gives no gradient, as in torch's CUDA kernel."""
    kernel, stride, ceil_mode = pool
    (kh, kw), (sh, sw) = _pair(kernel), _pair(stride)
    g = torch.Generator().manual_seed(7)
    n, c, h, w = 2, 3, 11, 13
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    out, idx = F.max_pool2d(x, kernel, stride, 0, 1, ceil_mode, return_indices=True)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    go[0, 0, 0, 0] = -0.0
    idx = idx.clone()
    idx[0, 1, 1, 1] = 0  # outside its window
    idx[0, 1, 1, 0] = idx[0, 1, 0, 1]  # outside its window, where another output's gradient goes too
    idx[0, 2, 1, 1] = idx[0, 2, 1, 0] = idx[0, 2, 0, 0] if (kh, kw) != (sh, sw) else -1  # repeated (if windows overlap)
    idx[1, 2, 0, 0] = -1  # no gradient
    rows, cols = torch.div(idx, w, rounding_mode="floor"), idx % w
    oh = torch.arange(out.shape[2]).view(1, 1, -1, 1)
    ow = torch.arange(out.shape[3]).view(1, 1, 1, -1)
    in_window = (rows >= oh * sh) & (rows < oh * sh + kh) & (cols >= ow * sw) & (cols < ow * sw + kw)
    counted = (idx >= 0) & (True if cpu_kernels_serve(device) else in_window)
    ref = torch.zeros(n * c, h * w, dtype=torch.float64)
    ref.scatter_add_(1, idx.clamp(min=0).reshape(n * c, -1), torch.where(counted, go, 0.0).reshape(n * c, -1))
    ref = ref.reshape(n, c, h, w)
    got = torch.ops.cnn_ext.max_pool2d_backward(go.to(device), idx.to(device), [n, c, h, w], [kh, kw], [sh, sw],
                                                 [0, 0], [1, 1], ceil_mode).cpu()
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert not got[got == 0].signbit().any()  # zeros are +0.0, including where the -0.0 gradient went
