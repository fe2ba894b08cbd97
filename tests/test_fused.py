"""The fused operator conv2d_maxpool_relu = relu(max_pool2d(conv2d(...))): parity of output, indices and every
gradient with torch's three ops, bitwise agreement with our own unfused ops, opcheck, gradcheck and argument errors.

Parity inputs are quantised (multiples of 1/4 and 1/8) so every convolution sum is exact in both dtypes: torch and
we then produce the same conv values bit for bit, ties inside pooling windows are real (and frequent), and the
indices must match exactly whatever the summation order."""

import pytest
import torch
import torch.nn.functional as F

import cnn_ext
from _support import DEVICES, assert_close, cpu_kernels_serve, grads

ops = torch.ops.cnn_ext

BASE = dict(n=2, c=4, h=11, w=10, k=6, kernel=3, stride=1, padding=0, groups=1, bias=True, pool=2, pool_stride=None,
            pool_padding=0, pool_dilation=1, ceil_mode=False)

# One factor at a time around BASE, then a few combinations.
_VARIATIONS = {
    "kernel": [1, 3, 5, (3, 1)],
    "stride": [1, 2],
    "padding": [0, 1, "same"],
    "groups": [1, 2],
    "bias": [True, False],
    "pool": [2, 3, (2, 3)],
    "pool_stride": [None, 1, 2],
    "pool_padding": [0, 1],
    "pool_dilation": [1, 2],
    "ceil_mode": [False, True],
}
_COMBOS = [
    dict(kernel=5, stride=2, padding=1, groups=2, pool=3, pool_stride=2, ceil_mode=True),
    dict(kernel=3, padding="same", bias=False, pool=3, pool_stride=1, pool_padding=1),
    dict(kernel=1, stride=2, pool=2, pool_stride=1, ceil_mode=True, groups=2),
    dict(kernel=3, padding=1, pool=3, pool_stride=2, pool_padding=1, pool_dilation=2, ceil_mode=True),
    dict(kernel=5, h=9, w=9, pool=2, ceil_mode=True),  # 5x5 conv output, 2x2 pool with a ragged last window
    dict(kernel=3, dilation=2, padding=2, pool=2),
]


def _cases():
    cases = [dict(BASE, **{name: value}) for name, values in _VARIATIONS.items() for value in values]
    cases += [dict(BASE, **combo) for combo in _COMBOS]
    return [c for c in cases if not (c["padding"] == "same" and c["stride"] != 1)]


CASES = _cases()


def _case_id(case):
    return ("k{kernel}_s{stride}_p{padding}_g{groups}_{b}_pool{pool}s{pool_stride}p{pool_padding}d{pool_dilation}"
            "{ceil}{dil}").format(b="bias" if case["bias"] else "nobias", ceil="_ceil" if case["ceil_mode"] else "",
                                  dil="_dil{}".format(case["dilation"]) if "dilation" in case else "",
                                  **case).replace(" ", "")


def _quantised(shape, scale, dtype, device, g, layout="contiguous"):
    t = (torch.randint(-4, 5, shape, generator=g).to(torch.float64) * scale).to(dtype=dtype, device=device)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(True)


def _args(case):
    conv = dict(stride=case["stride"], padding=case["padding"], dilation=case.get("dilation", 1),
                groups=case["groups"])
    pool = dict(kernel_size=case["pool"], stride=case["pool_stride"], padding=case["pool_padding"],
                dilation=case["pool_dilation"], ceil_mode=case["ceil_mode"])
    return conv, pool


def _pair(v):
    return list(torch.nn.modules.utils._pair(v))


def _ours(x, w, b, conv, pool):
    """Our fused op with its indices (the operator itself, which autograd differentiates), checked against the
    functional API's output for the same arguments."""
    dilation = _pair(conv["dilation"])
    padding = conv["padding"]
    if padding == "same":  # odd kernels only here: symmetric padding
        padding = [d * (k - 1) // 2 for d, k in zip(dilation, w.shape[2:])]
    kernel = _pair(pool["kernel_size"])
    out, idx = ops.conv2d_maxpool_relu(x, w, b, _pair(conv["stride"]), _pair(padding), dilation, conv["groups"],
                                       kernel, kernel if pool["stride"] is None else _pair(pool["stride"]),
                                       _pair(pool["padding"]), _pair(pool["dilation"]), pool["ceil_mode"])
    functional_out = cnn_ext.functional.conv2d_maxpool_relu(
        x, w, b, **conv, pool_kernel_size=pool["kernel_size"], pool_stride=pool["stride"],
        pool_padding=pool["padding"], pool_dilation=pool["dilation"], ceil_mode=pool["ceil_mode"])
    assert torch.equal(functional_out, out)
    return out, idx


def run_parity(case, dtype, device, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    kh, kw = torch.nn.modules.utils._pair(case["kernel"])
    x = _quantised((case["n"], case["c"], case["h"], case["w"]), 0.25, dtype, device, g, layout)
    w = _quantised((case["k"], case["c"] // case["groups"], kh, kw), 0.125, dtype, device, g, layout)
    b = _quantised((case["k"],), 0.125, dtype, device, g) if case["bias"] else None
    conv, pool = _args(case)

    out, idx = _ours(x, w, b, conv, pool)
    ref_pooled, ref_idx = F.max_pool2d(F.conv2d(x, w, b, **conv), return_indices=True, **pool)
    ref = torch.relu(ref_pooled)
    assert out.shape == ref.shape and idx.dtype == torch.int64
    assert_close(out, ref, dtype, msg="forward")
    assert torch.equal(idx.cpu(), ref_idx.cpu()), "indices"

    grad_out = _quantised(ref.shape, 0.25, dtype, device, g).detach()
    scale = max(1.0, (case["n"] * ref.shape[2] * ref.shape[3]) ** 0.5)
    for name, got, want in zip(("input", "weight", "bias"), grads(out, [x, w, b], grad_out),
                               grads(ref, [x, w, b], grad_out)):
        if want is not None:
            assert_close(got, want, dtype, scale=1.0 if name == "input" else scale, msg=f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fused_matches_torch(case, dtype, device):
    run_parity(case, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_channels_last(device):
    run_parity(dict(BASE, padding=1, groups=2), torch.float64, device, "channels_last")
    run_parity(dict(BASE, kernel=5), torch.float32, device, "channels_last")


@pytest.mark.parametrize("device", DEVICES)
def test_fused_mnist_shapes(device):
    """The seed model's two conv + pool + relu layers at its batch size, float32 (the fused fast path)."""
    for shape in (dict(n=128, c=1, h=28, w=28, k=10), dict(n=128, c=10, h=12, w=12, k=20)):
        run_parity(dict(BASE, kernel=5, **shape), torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_fused_equals_unfused_bitwise(dtype, device):
    """Continuous random data: the fused op gives bit for bit our own conv2d -> max_pool2d -> relu."""
    g = torch.Generator().manual_seed(5)
    for case in (dict(n=3, c=10, h=12, w=12, k=20, kernel=5, padding=0, stride=1, pool=2, pool_stride=2),
                 dict(n=2, c=3, h=13, w=11, k=7, kernel=3, padding=1, stride=2, pool=3, pool_stride=1),
                 dict(n=2, c=4, h=9, w=9, k=6, kernel=3, padding=1, stride=1, pool=3, pool_stride=2)):
        x = torch.randn(case["n"], case["c"], case["h"], case["w"], generator=g, dtype=torch.float64).to(dtype)
        w = torch.randn(case["k"], case["c"], case["kernel"], case["kernel"], generator=g,
                        dtype=torch.float64).to(dtype)
        b = torch.randn(case["k"], generator=g, dtype=torch.float64).to(dtype)
        x, w, b = x.to(device), w.to(device), b.to(device)
        conv = ([case["stride"]] * 2, [case["padding"]] * 2, [1, 1], 1)
        pool = ([case["pool"]] * 2, [case["pool_stride"]] * 2, [0, 0], [1, 1], True)
        out, idx = ops.conv2d_maxpool_relu(x, w, b, *conv, *pool)
        pooled, ref_idx = ops.max_pool2d(ops.conv2d(x, w, b, *conv), *pool)
        assert torch.equal(idx, ref_idx)
        assert torch.equal(out, torch.relu(pooled))


@pytest.mark.parametrize("device", DEVICES)
def test_fused_nan_and_padding_windows(device):
    """NaN propagates through max and ReLU; a pooling window wholly in padding gives 0 and index -1."""
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, device=device)
    x[0, 0, 2, 3] = float("nan")
    w = torch.ones(3, 2, 1, 1, dtype=torch.float64, device=device)
    out, idx = ops.conv2d_maxpool_relu(x, w, None, [1, 1], [0, 0], [1, 1], 1, [2, 2], [2, 2], [0, 0], [1, 1], False)
    assert torch.isnan(out[0, :, 1, 1]).all() and (idx[0, :, 1, 1] == 2 * 6 + 3).all()
    # 3x3 windows with dilation 3 and padding 1, stride 3, over a 4x4 conv output: the last row's and column's taps
    # all fall past the end (clipped) or in the padding; torch agrees on which.
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64, device=device)
    w = torch.ones(1, 1, 1, 1, dtype=torch.float64, device=device)
    args = ([1, 1], [0, 0], [1, 1], 1, [3, 3], [3, 3], [1, 1], [3, 3], True)
    out, idx = ops.conv2d_maxpool_relu(x, w, None, *args)
    ref, ref_idx = ops.max_pool2d(x, [3, 3], [3, 3], [1, 1], [3, 3], True)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(out, torch.relu(ref))


def _opcheck_samples(device):
    g = torch.Generator().manual_seed(0)

    def t(*shape, requires_grad=False):
        return torch.randn(shape, dtype=torch.float64, generator=g).to(device).requires_grad_(requires_grad)

    x, w, b = t(2, 4, 9, 8, requires_grad=True), t(6, 2, 3, 2, requires_grad=True), t(6, requires_grad=True)
    conv = ([1, 1], [1, 0], [1, 1], 2)
    pool = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    pool_odd = ([3, 2], [2, 1], [1, 1], [1, 1], True)
    out, idx = ops.conv2d_maxpool_relu(x, w, b, *conv, *pool_odd)
    gy = t(*out.shape)
    # float32 with 17 images: the CPU's batch-in-lanes kernels (a full block of 16 and a partial one).
    x32, w32 = x.detach().float().repeat(9, 2, 1, 1)[:17], w.detach().float().repeat(1, 4, 1, 1)
    conv32 = ([1, 1], [1, 0], [1, 1], 1)
    out32, idx32 = ops.conv2d_maxpool_relu(x32, w32, None, *conv32, *pool)
    fused_backward = (out.detach(), idx, x.detach(), w.detach(), *conv, *pool_odd)
    return [
        (ops.conv2d_maxpool_relu, (x, w, b, *conv, *pool)),
        (ops.conv2d_maxpool_relu, (x, w, None, [2, 1], [0, 1], [1, 2], 1 * 2, *pool_odd)),
        (ops.conv2d_maxpool_relu_backward_pool, (gy, *fused_backward)),
        (ops.conv2d_maxpool_relu_backward, (gy, *fused_backward, [True, True, True])),
        (ops.conv2d_maxpool_relu_backward, (gy, *fused_backward, [False, True, False])),
        (ops.conv2d_maxpool_relu, (x32, w32, None, *conv32, *pool)),
        (ops.conv2d_maxpool_relu_backward,
         (torch.randn_like(out32), out32, idx32, x32, w32, *conv32, *pool, [True, True, False])),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(7))
def test_fused_opcheck(index, device):
    op, args = _opcheck_samples(device)[index]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_gradcheck(device):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, generator=g).to(device).requires_grad_(True)
    w = torch.randn(6, 2, 3, 2, dtype=torch.float64, generator=g).to(device).requires_grad_(True)
    b = torch.randn(6, dtype=torch.float64, generator=g).to(device).requires_grad_(True)
    for kwargs in (dict(groups=2, padding=1, pool_kernel_size=2),
                   dict(groups=2, stride=(2, 1), pool_kernel_size=(2, 3), pool_stride=1, ceil_mode=True)):
        assert torch.autograd.gradcheck(lambda x, w, b: cnn_ext.functional.conv2d_maxpool_relu(x, w, b, **kwargs),
                                        (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
def test_fused_errors_name_the_argument(device):
    x = torch.randn(1, 2, 8, 8, device=device)
    w = torch.randn(3, 2, 3, 3, device=device)
    with pytest.raises(ValueError, match="kernel_size"):
        cnn_ext.functional.conv2d_maxpool_relu(x, w, pool_kernel_size=0)
    with pytest.raises(ValueError, match="pool_stride"):
        cnn_ext.functional.conv2d_maxpool_relu(x, w, pool_stride=(1, 2, 3))
    with pytest.raises(ValueError, match="groups"):
        cnn_ext.functional.conv2d_maxpool_relu(x, w, groups=3)
    with pytest.raises(ValueError, match="padding"):  # pooling padding above half the window
        cnn_ext.functional.conv2d_maxpool_relu(x, w, pool_kernel_size=2, pool_padding=2)
    with pytest.raises(TypeError, match="dtype"):
        cnn_ext.functional.conv2d_maxpool_relu(x, w.double())


def test_fused_nn_helper_and_thread_count():
    """ext_nn.conv_maxpool_relu takes the fused op for our layers and matches the three torch layers; the result
    does not depend on the thread count."""
    torch.manual_seed(0)
    conv, pool = cnn_ext.nn.Conv2d(3, 5, 3), cnn_ext.nn.MaxPool2d(2)
    ref_conv = torch.nn.Conv2d(3, 5, 3)
    ref_conv.load_state_dict(conv.state_dict())
    x = torch.randn(4, 3, 15, 15)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, max(2, before)):
            torch.set_num_threads(threads)
            results.append(cnn_ext.nn.conv_maxpool_relu(conv, pool, x))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])
    assert_close(results[0], cnn_ext.nn.conv_maxpool_relu(ref_conv, torch.nn.MaxPool2d(2), x), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_backward_pool_matches_its_definition(device):
    """conv2d_maxpool_relu_backward_pool (on CPU a kernel of its own) is bit for bit ReLU's threshold_backward then
    max_pool2d_backward, with overlapping windows too; a bad index is reported, naming the op."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, generator=g).to(device)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g).to(device)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    for pool in (([2, 2], [2, 2], [0, 0], [1, 1], False), ([3, 3], [1, 2], [1, 1], [1, 1], True)):
        out, idx = ops.conv2d_maxpool_relu(x, w, None, *conv, *pool)
        gy = torch.randn(out.shape, dtype=torch.float64, generator=g).to(device)
        got = ops.conv2d_maxpool_relu_backward_pool(gy, out, idx, x, w, *conv, *pool)
        conv_shape = list(ops.conv2d(x, w, None, *conv).shape)
        want = ops.max_pool2d_backward(torch.ops.aten.threshold_backward(gy, out, 0), idx, conv_shape, *pool)
        assert torch.equal(got, want)
    if cpu_kernels_serve(device):  # elsewhere the composite reports it as max_pool2d_backward
        bad = idx.clone()
        bad[1, 2, 0, 0] = 10**6
        with pytest.raises(ValueError, match=r"conv2d_maxpool_relu_backward_pool: indices\[1, 2, 0, 0\]"):
            ops.conv2d_maxpool_relu_backward_pool(gy, out, bad, x, w, *conv, *pool)
