"""conv2d parity with torch.nn.functional.conv2d: outputs and the gradients of input, weight and bias."""

import contextlib
import itertools
import random

import pytest
import torch
import torch.nn.functional as F

import cnn_ext
from _support import CUDA_KERNEL_DEVICES, DEVICES, LAYOUTS, Emulated, assert_close, grads, make_tensor
from cnn_ext import cuda_emulation

BASE = dict(n=2, c=4, h=11, w=13, k=6, kernel=3, stride=1, padding=1, dilation=1, groups=1, bias=True)

# One factor at a time around BASE, so each value of each hyper-parameter is covered on its own ...
_VARIATIONS = {
    "kernel": [1, 2, 3, 5, 7, (1, 3), (3, 5), (5, 2)],
    "stride": [1, 2, 3, (1, 2), (3, 1)],
    "padding": [0, 1, 2, 3, (0, 2), (3, 1), "valid", "same"],
    "dilation": [1, 2, 3, (1, 3), (2, 1)],
    "groups": [1, 2, 4],  # 4 == c: depthwise (with k=8, a channel multiplier of 2)
    "bias": [True, False],
    "n": [1, 3],
    "hw": [(7, 9), (5, 5), (16, 3), (1, 1)],
    # More than 16 input channels per group: the CUDA input gradient is an implicit GEMM there, a direct kernel below.
    "c": [4, 36],
}


def _case(**changes):
    case = dict(BASE, **changes)
    if "hw" in case:
        case["h"], case["w"] = case.pop("hw")
    if case["groups"] == 4:
        case["k"] = 8
    return case


def _fits(case):
    """Whether torch accepts the configuration (kernel fits the padded input; 'same' needs stride 1)."""
    kh, kw = torch.nn.modules.utils._pair(case["kernel"])
    dh, dw = torch.nn.modules.utils._pair(case["dilation"])
    if isinstance(case["padding"], str):
        if case["padding"] == "same":
            return torch.nn.modules.utils._pair(case["stride"]) == (1, 1)
        ph = pw = 0
    else:
        ph, pw = torch.nn.modules.utils._pair(case["padding"])
    return case["h"] + 2 * ph >= dh * (kh - 1) + 1 and case["w"] + 2 * pw >= dw * (kw - 1) + 1


def _conv_cases():
    cases = [_case(**{name: value}) for name, values in _VARIATIONS.items() for value in values]
    # ... plus a fixed random sample of combinations, so hyper-parameters also meet each other.
    rng = random.Random(0)
    product = list(itertools.product(*_VARIATIONS.values()))
    rng.shuffle(product)
    cases = [c for c in cases if _fits(c)]
    for values in product:
        if len(cases) >= 110:
            break
        case = _case(**dict(zip(_VARIATIONS, values)))
        if _fits(case):
            cases.append(case)
    return cases


CONV_CASES = _conv_cases()


def _case_id(case):
    return "n{n}c{c}k{k}_{h}x{w}_ker{kernel}_s{stride}_p{padding}_d{dilation}_g{groups}_{b}".format(
        b="bias" if case["bias"] else "nobias", **case).replace(" ", "")


def run_conv_parity(case, dtype, device, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    kh, kw = torch.nn.modules.utils._pair(case["kernel"])
    x = make_tensor((case["n"], case["c"], case["h"], case["w"]), dtype, device, layout, g, requires_grad=True)
    w = make_tensor((case["k"], case["c"] // case["groups"], kh, kw), dtype, device, layout, g, requires_grad=True)
    b = make_tensor((case["k"],), dtype, device, "contiguous", g, requires_grad=True) if case["bias"] else None
    args = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"], groups=case["groups"])

    ours = cnn_ext.functional.conv2d(x, w, b, **args)
    ref = F.conv2d(x, w, b, **args)
    assert ours.shape == ref.shape
    assert_close(ours, ref, dtype, msg="forward")

    grad_out = make_tensor(ref.shape, dtype, device, "contiguous", g)
    for name, got, want in zip(("input", "weight", "bias"), grads(ours, [x, w, b], grad_out),
                               grads(ref, [x, w, b], grad_out)):
        if want is not None:
            # Weight and bias gradients sum over the batch and all output pixels.
            scale = 1.0 if name == "input" else max(1.0, (case["n"] * ref.shape[2] * ref.shape[3]) ** 0.5)
            assert_close(got, want, dtype, scale=scale, msg=f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CONV_CASES, ids=_case_id)
def test_conv2d_matches_torch(case, dtype, device):
    run_conv_parity(case, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", [_case(), _case(groups=2, stride=2), _case(groups=4, kernel=(3, 5), bias=False)],
                         ids=_case_id)
def test_conv2d_memory_layouts(case, layout, device):
    run_conv_parity(case, torch.float64, device, layout)


@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_unbatched_input(device):
    x = torch.randn(3, 9, 8, dtype=torch.float64, device=device)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, device=device)
    out = cnn_ext.functional.conv2d(x, w, padding=1)
    assert out.shape == (5, 9, 8)
    assert_close(out, F.conv2d(x, w, padding=1), torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_mnist_shapes(device):
    """The seed model's two convolutions at its batch size, float32."""
    for case in (dict(n=128, c=1, h=28, w=28, k=10), dict(n=128, c=10, h=12, w=12, k=20)):
        run_conv_parity(dict(BASE, kernel=5, padding=0, **case), torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_larger_channels(device):
    """Enough channels and pixels to exercise cache blocking and every GEMM edge."""
    case = dict(BASE, n=3, c=67, k=45, h=23, w=19, kernel=3, padding=1)
    run_conv_parity(case, torch.float32, device)
    run_conv_parity(dict(case, kernel=1, padding=0, stride=2), torch.float64, device)


@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_empty_batch(device):
    x = torch.randn(0, 3, 8, 8, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    out = cnn_ext.functional.conv2d(x, w, b)
    assert out.shape == (0, 4, 6, 6)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_is_deterministic(device):
    """Same inputs give bitwise the same output and gradients."""
    case = dict(BASE, n=8, c=16, k=24, h=20, w=20)
    g = torch.Generator().manual_seed(1)
    x = make_tensor((case["n"], case["c"], case["h"], case["w"]), torch.float32, device, generator=g,
                    requires_grad=True)
    w = make_tensor((case["k"], case["c"], 3, 3), torch.float32, device, generator=g, requires_grad=True)
    b = make_tensor((case["k"],), torch.float32, device, generator=g, requires_grad=True)

    def run():
        out = cnn_ext.functional.conv2d(x, w, b, padding=1)
        return [out] + list(torch.autograd.grad(out, [x, w, b], torch.ones_like(out)))

    first, second = run(), run()
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


def test_conv2d_honours_thread_count():
    """The CPU kernels give the same answer with one thread as with several."""
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, max(2, before)):
            torch.set_num_threads(threads)
            g = torch.Generator().manual_seed(3)
            x = make_tensor((4, 8, 15, 15), torch.float64, "cpu", generator=g, requires_grad=True)
            w = make_tensor((8, 8, 3, 3), torch.float64, "cpu", generator=g, requires_grad=True)
            out = cnn_ext.functional.conv2d(x, w, padding=1)
            results.append([out] + list(torch.autograd.grad(out, [x, w], torch.ones_like(out))))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert_close(a, b, torch.float64)


@pytest.mark.parametrize("device", CUDA_KERNEL_DEVICES)
@pytest.mark.parametrize("tile", ["128x64", "128x128"])
def test_conv2d_larger_cuda_tiles(tile, device, monkeypatch):
    """The CUDA implicit GEMM's larger block tiles (CNN_EXT_CUDA_TILE): every direction, tile overhang in M and N,
    split K, groups with stride and dilation, a GEMM input gradient (more than 16 channels per group), and float64,
    which keeps the 64x64 tile."""
    monkeypatch.setenv("CNN_EXT_CUDA_TILE", tile)
    with contextlib.ExitStack() as stack:
        launched = stack.enter_context(cuda_emulation.launches()) if isinstance(device, Emulated) else None
        run_conv_parity(dict(BASE, n=3, c=67, k=45, h=23, w=19, kernel=3, padding=1), torch.float32, device)
        run_conv_parity(dict(BASE, n=2, c=36, k=70, h=8, w=7, kernel=(3, 2), stride=(2, 1), padding=(1, 0),
                             dilation=(1, 2), groups=2), torch.float32, device)
        run_conv_parity(dict(BASE, n=1, c=32, k=32, h=6, w=6), torch.float32, device)  # fprop and dgrad split K
        run_conv_parity(dict(BASE, c=20, k=130), torch.float64, device)
    if launched is not None:
        gemms = [name for name, *_ in launched if name.startswith("implicit_gemm_kernel")]
        rows, cols = tile.split("x")
        assert sum(f"GemmTile<{rows}, {cols}," in name and "<float," in name for name in gemms) == 9  # 3 dirs × 3
        assert all("GemmTile<64, 64," in name for name in gemms if "<double," in name)


@pytest.mark.parametrize("device", CUDA_KERNEL_DEVICES)
def test_unknown_cuda_tile_is_named(device, monkeypatch):
    monkeypatch.setenv("CNN_EXT_CUDA_TILE", "96x96")
    x = make_tensor((1, 20, 5, 5), torch.float32, device)
    w = make_tensor((4, 20, 3, 3), torch.float32, device)
    with pytest.raises(ValueError, match="CNN_EXT_CUDA_TILE must be 64x64, 128x64 or 128x128, got '96x96'"):
        cnn_ext.functional.conv2d(x, w)
