"""Property-based parity with torch: hypothesis draws random *legal* configurations of every op and checks forward
(and max-pool indices) and every gradient against torch.nn.functional.

The hand-picked cases in test_conv_parity.py / test_pool_parity.py vary one factor at a time; these tests let all
factors meet at once (odd sizes, non-square kernels, dilation with ceil_mode, depthwise with 'same', unbatched
channels_last, ...). Runs are reproducible (derandomize=True, no example database), each case is tiny so the file stays
fast on a 2-core CI machine, and CNN_EXT_FUZZ_EXAMPLES raises the number of examples per op (e.g. for a GPU run).
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("hypothesis", reason="property-based tests need hypothesis")

from hypothesis import HealthCheck, assume, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import cnn_ext
import regressions
from _support import (DEVICES, LAYOUTS, assert_close, check_avg_pool2d, check_max_pool2d, grads, is_emulated,  # noqa: E402
                      make_tensor)

EXAMPLES = int(os.environ.get("CNN_EXT_FUZZ_EXAMPLES", "200"))

FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,  # the same examples on every run, so CI is reproducible
    database=None,  # ... and no local example database can change what runs
    deadline=None,  # timing varies a lot on a shared 2-core machine; speed is not what is tested here
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

MAX_SIZE = 12  # spatial sizes
MAX_CHANNELS = 8

DTYPES = st.sampled_from([torch.float32, torch.float64])


def _as_arg(draw, pair):
    """A (h, w) hyper-parameter the way a caller may spell it: an int when both are equal (sometimes), else a pair
    (tuple or list), so functional's argument normalisation is fuzzed too."""
    if pair[0] == pair[1] and draw(st.booleans()):
        return pair[0]
    return draw(st.sampled_from([tuple, list]))(pair)


def _shape(n, c, h, w):
    """NCHW, or CHW for an unbatched input (n is None)."""
    return (c, h, w) if n is None else (n, c, h, w)


# ---------------------------------------------------------------------------------------------------------------------
# conv2d
# ---------------------------------------------------------------------------------------------------------------------


@st.composite
def conv_cases(draw):
    groups_kind = draw(st.sampled_from(["1", "g", "depthwise"]))
    if groups_kind == "1":
        groups, c = 1, draw(st.integers(1, MAX_CHANNELS))
        k = draw(st.integers(1, MAX_CHANNELS))
    elif groups_kind == "g":
        groups = draw(st.integers(2, 4))
        c = groups * draw(st.integers(1, MAX_CHANNELS // groups))
        k = groups * draw(st.integers(1, MAX_CHANNELS // groups))
    else:  # depthwise: one group per input channel, a channel multiplier of 1 or 2
        c = groups = draw(st.integers(1, MAX_CHANNELS // 2))
        k = c * draw(st.integers(1, 2))
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding_kind = draw(st.sampled_from(["ints", "ints", "ints", "valid", "same"]))
    if padding_kind == "same":
        stride = (1, 1)  # torch allows 'same' only without striding
        padding = "same"
        pads = (0, 0)  # any input size fits: 'same' pads to the input size
    elif padding_kind == "valid":
        padding, pads = "valid", (0, 0)
    else:
        pads = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
        padding = _as_arg(draw, pads)
    sizes = []
    for k_i, d_i, p_i in zip(kernel, dilation, pads):
        # Smallest size the (dilated) kernel fits in, once padded; filtered out if even MAX_SIZE is too small.
        smallest = max(1, d_i * (k_i - 1) + 1 - 2 * p_i) if padding != "same" else 1
        assume(smallest <= MAX_SIZE)
        sizes.append(draw(st.integers(smallest, MAX_SIZE)))
    return dict(
        n=draw(st.one_of(st.none(), st.integers(1, 3))),  # None: unbatched 3-D input
        c=c, k=k, h=sizes[0], w=sizes[1], kernel=kernel, groups=groups,
        stride=_as_arg(draw, stride), padding=padding, dilation=_as_arg(draw, dilation),
        bias=draw(st.booleans()),
        # Which gradients are wanted: autograd then asks for only some backward ops.
        requires_grad=draw(st.sampled_from(["all", "all", "all", "input", "weight"])),
        dtype=draw(DTYPES),
        input_layout=draw(st.sampled_from(LAYOUTS)),
        weight_layout=draw(st.sampled_from(LAYOUTS)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def check_conv(case, device):
    dtype, g = case["dtype"], torch.Generator().manual_seed(case["seed"])
    wants = case["requires_grad"]
    x = make_tensor(_shape(case["n"], case["c"], case["h"], case["w"]), dtype, device, case["input_layout"], g,
                    requires_grad=wants in ("all", "input"))
    w = make_tensor((case["k"], case["c"] // case["groups"], *case["kernel"]), dtype, device, case["weight_layout"], g,
                    requires_grad=wants in ("all", "weight"))
    b = make_tensor((case["k"],), dtype, device, "contiguous", g, requires_grad=wants == "all") \
        if case["bias"] else None
    args = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"], groups=case["groups"])

    ours = cnn_ext.functional.conv2d(x, w, b, **args)
    ref = F.conv2d(x, w, b, **args)
    assert ours.shape == ref.shape
    assert ours.dtype == ref.dtype
    assert_close(ours, ref, dtype, msg="forward")

    grad_out = make_tensor(ref.shape, dtype, device, "contiguous", g)
    n_pixels = (case["n"] or 1) * ref.shape[-1] * ref.shape[-2]
    for name, got, want in zip(("input", "weight", "bias"), grads(ours, [x, w, b], grad_out),
                               grads(ref, [x, w, b], grad_out)):
        if want is not None:
            # Weight and bias gradients sum over the batch and every output pixel: allow for the longer sums.
            scale = 1.0 if name == "input" else max(1.0, n_pixels ** 0.5)
            assert got.shape == want.shape
            assert_close(got, want, dtype, scale=scale, msg=f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's note on its own 'same' implementation
@FUZZ
@given(case=conv_cases())
# Fixed corners, tried first on every run: depthwise 'same' with an even dilated kernel (the asymmetric-padding path),
# and a 1x1 unbatched input with a kernel that only fits thanks to padding.
@example(case=dict(n=2, c=4, k=8, h=5, w=7, kernel=(4, 2), groups=4, stride=1, padding="same", dilation=(1, 3),
                   bias=True, requires_grad="all", dtype=torch.float64, input_layout="channels_last",
                   weight_layout="strided", seed=0))
@example(case=dict(n=None, c=3, k=2, h=1, w=1, kernel=(5, 3), groups=1, stride=(3, 1), padding=(2, 1), dilation=1,
                   bias=False, requires_grad="all", dtype=torch.float32, input_layout="strided",
                   weight_layout="contiguous", seed=1))
def test_conv2d_fuzz(case, device):
    check_conv(case, device)


# ---------------------------------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------------------------------


def _pool_out_size(size, k, s, p, d, ceil_mode):
    """torch's pooling_output_shape, exactly (floor division rounding towards -inf, the ceil_mode correction)."""
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _some_window_in_padding(size, out, k, s, p, d):
    """Whether some output's window has no tap inside the input. torch's max-pool index there is arbitrary (ours is
    -1, see test_max_pool2d_window_in_padding), so such configurations cannot be compared and are left out."""
    return any(not any(0 <= o * s - p + j * d < size for j in range(k)) for o in range(out))


@st.composite
def pool_cases(draw, with_dilation):
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    stride = None if draw(st.integers(0, 4)) == 0 else (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    pads = tuple(draw(st.integers(0, k // 2)) for k in kernel)  # torch: padding at most half the kernel
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3))) if with_dilation else (1, 1)
    ceil_mode = draw(st.booleans())
    sizes = (draw(st.integers(1, MAX_SIZE)), draw(st.integers(1, MAX_SIZE)))
    strides = kernel if stride is None else stride
    for size, k, s, p, d in zip(sizes, kernel, strides, pads, dilation):
        out = _pool_out_size(size, k, s, p, d, ceil_mode)
        assume(out >= 1)  # otherwise torch rejects the configuration
        if with_dilation:
            assume(not _some_window_in_padding(size, out, k, s, p, d))
    return dict(
        n=draw(st.one_of(st.none(), st.integers(1, 3))), c=draw(st.integers(1, MAX_CHANNELS)),
        h=sizes[0], w=sizes[1],
        kernel=_as_arg(draw, kernel),
        stride=None if stride is None else _as_arg(draw, stride),
        padding=_as_arg(draw, pads),
        dilation=_as_arg(draw, dilation),
        ceil_mode=ceil_mode,
        dtype=draw(DTYPES),
        layout=draw(st.sampled_from(LAYOUTS)),
        # Rounded values make windows hold equal maxima: the index must still be torch's (the first).
        ties=draw(st.booleans()) if with_dilation else False,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@st.composite
def avg_pool_cases(draw):
    case = draw(pool_cases(with_dilation=False))
    del case["dilation"], case["ties"]
    case["count_include_pad"] = draw(st.booleans())
    case["divisor_override"] = draw(st.sampled_from([None, None, None, 1, 2, 3, 7, -2]))
    return case


def _pool_input(case, device):
    g = torch.Generator().manual_seed(case["seed"])
    x = make_tensor(_shape(case["n"], case["c"], case["h"], case["w"]), case["dtype"], device, case["layout"], g)
    if case.get("ties"):
        x = x.mul(1.5).round().clamp(-2, 2)  # five distinct values
    return x.detach().requires_grad_(True), g


def check_max_pool(case, device):
    x, g = _pool_input(case, device)
    check_max_pool2d(x, case, case["dtype"], g)


def check_avg_pool(case, device):
    x, g = _pool_input(case, device)
    check_avg_pool2d(x, case, case["dtype"], g)


# A window larger than the whole input is legal with ceil_mode and a large stride (torch's output-size formula gives
# one output): tried first on every run.
_WINDOW_OVER_INPUT = dict(n=1, c=2, h=4, w=3, kernel=(7, 6), stride=(4, 5), padding=(0, 1), ceil_mode=True,
                          dtype=torch.float64, layout="contiguous", seed=0)


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(case=pool_cases(with_dilation=True))
@example(case=dict(_WINDOW_OVER_INPUT, dilation=1, ties=False))
def test_max_pool2d_fuzz(case, device):
    check_max_pool(case, device)


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(case=avg_pool_cases())
@example(case=dict(_WINDOW_OVER_INPUT, count_include_pad=True, divisor_override=None))
@example(case=dict(_WINDOW_OVER_INPUT, count_include_pad=False, divisor_override=None))
def test_avg_pool2d_fuzz(case, device):
    check_avg_pool(case, device)


# ---------------------------------------------------------------------------------------------------------------------
# The fused conv2d + max_pool2d + ReLU
# ---------------------------------------------------------------------------------------------------------------------


def _conv_out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@st.composite
def fused_cases(draw):
    """A legal convolution (as conv_cases draws them) and a legal max pooling of its output."""
    conv = draw(conv_cases())
    pair = torch.nn.modules.utils._pair
    if conv["padding"] == "same":
        out_sizes = (conv["h"], conv["w"])
    else:
        pads = (0, 0) if conv["padding"] == "valid" else pair(conv["padding"])
        out_sizes = tuple(_conv_out_size(size, k, s, p, d) for size, k, s, p, d in zip(
            (conv["h"], conv["w"]), conv["kernel"], pair(conv["stride"]), pads, pair(conv["dilation"])))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pads = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    ceil_mode = draw(st.booleans())
    for size, k, s, p, d in zip(out_sizes, kernel, stride, pads, dilation):
        out = _pool_out_size(size, k, s, p, d, ceil_mode)
        assume(out >= 1 and not _some_window_in_padding(size, out, k, s, p, d))
    return dict(conv, pool=dict(pool_kernel_size=_as_arg(draw, kernel), pool_stride=_as_arg(draw, stride),
                                pool_padding=_as_arg(draw, pads), pool_dilation=_as_arg(draw, dilation),
                                ceil_mode=ceil_mode))


def check_fused(case, device):
    """Inputs on a coarse grid (multiples of 1/4 and 1/8), so every convolution value is exact in both dtypes and
    pooling ties are real: the maxima, hence the gradients' destinations, must be torch's exactly."""
    dtype, g = case["dtype"], torch.Generator().manual_seed(case["seed"])

    def grid(shape, scale, layout, requires_grad):
        t = make_tensor(shape, torch.float64, "cpu", layout, g).mul(4).round().clamp(-4, 4).mul(scale)
        return t.to(dtype=dtype, device=device).requires_grad_(requires_grad)

    wants = case["requires_grad"]
    x = grid(_shape(case["n"], case["c"], case["h"], case["w"]), 0.25, case["input_layout"], wants in ("all", "input"))
    w = grid((case["k"], case["c"] // case["groups"], *case["kernel"]), 0.125, case["weight_layout"],
             wants in ("all", "weight"))
    b = grid((case["k"],), 0.125, "contiguous", wants == "all") if case["bias"] else None
    conv = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"], groups=case["groups"])
    pool = case["pool"]
    ours = cnn_ext.functional.conv2d_maxpool_relu(x, w, b, **conv, **pool)
    ref = torch.relu(F.max_pool2d(F.conv2d(x, w, b, **conv), pool["pool_kernel_size"], pool["pool_stride"],
                                  pool["pool_padding"], pool["pool_dilation"], pool["ceil_mode"]))
    assert ours.shape == ref.shape
    assert_close(ours, ref, dtype, msg="forward")
    grad_out = grid(ref.shape, 0.25, "contiguous", False)
    for name, got, want in zip(("input", "weight", "bias"), grads(ours, [x, w, b], grad_out),
                               grads(ref, [x, w, b], grad_out)):
        if want is not None:
            assert_close(got, want, dtype, msg=f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.filterwarnings("ignore:Using padding='same'")
@FUZZ
@given(case=fused_cases())
def test_conv2d_maxpool_relu_fuzz(case, device):
    check_fused(case, device)


# ---------------------------------------------------------------------------------------------------------------------
# Legal but extreme hyper-parameters, beyond what torch computes (it converts them to 32-bit int and refuses): the
# expected results are written out by hand. Offsets like o*stride - padding must be computed in 64 bits.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("big", [2**20, 2**31, 2**40, 2**60])
def test_conv2d_huge_stride_and_padding(big, device):
    """padding = stride = big: three outputs per dimension, whose windows start at -big (all padding), 0 and +big
    (all padding). Only the centre output sees the input. The weight gradient is left out: it crashes for some of
    these values (tests/regressions.py CRASHES, run in a child by test_crash_regressions)."""
    g = torch.Generator().manual_seed(0)
    x = make_tensor((1, 2, 6, 6), torch.float64, device, generator=g, requires_grad=True)
    w = make_tensor((3, 2, 5, 5), torch.float64, device, generator=g)
    b = make_tensor((3,), torch.float64, device, generator=g, requires_grad=True)
    out = cnn_ext.functional.conv2d(x, w, b, stride=big, padding=big)
    expected = b.detach().view(1, 3, 1, 1).expand(1, 3, 3, 3).clone()
    expected[:, :, 1, 1] += F.conv2d(x[:, :, :5, :5], w).detach().view(1, 3)
    assert_close(out, expected, torch.float64)
    out.sum().backward()
    grad_x = torch.zeros_like(x)
    grad_x[:, :, :5, :5] = w.sum(0)
    assert_close(x.grad, grad_x, torch.float64)
    assert_close(b.grad, torch.full_like(b, 9.0), torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_pool_window_of_2_to_the_31(device):
    """kernel 2**31 with padding 2**30 (at most half the kernel, so legal): one window covering the whole input."""
    x = make_tensor((2, 3, 5, 7), torch.float64, device, generator=torch.Generator().manual_seed(0))
    k, p = 2**31, 2**30
    out, idx = cnn_ext.functional.max_pool2d(x, k, padding=p, return_indices=True)
    assert out.shape == idx.shape == (2, 3, 1, 1)
    assert torch.equal(out.flatten(), x.flatten(2).amax(2).flatten())
    assert torch.equal(idx.flatten(), x.flatten(2).argmax(2).flatten())
    mean = cnn_ext.functional.avg_pool2d(x, k, padding=p, count_include_pad=False)
    assert_close(mean.flatten(), x.mean((2, 3)).flatten(), torch.float64)
    # Counting the padding, the window holds exactly 2**31 * 2**31 pixels (it ends at input + padding).
    total = cnn_ext.functional.avg_pool2d(x, k, padding=p, count_include_pad=True)
    assert_close(total.flatten() * 2.0**62, x.sum((2, 3)).flatten(), torch.float64)


# ---------------------------------------------------------------------------------------------------------------------
# Legal calls that crashed the process: each runs in a child (a crash must fail one test, not kill pytest).
# ---------------------------------------------------------------------------------------------------------------------


def _crash_params():
    # An open bug is a strict xfail on its assertion only: a hang (TimeoutExpired) still fails.
    return [pytest.param(case, id=case["id"], marks=_open_bug(case)) for case in regressions.CRASHES]


def _open_bug(case):
    return [pytest.mark.xfail(strict=True, raises=AssertionError, reason=case["bug"])] if case.get("bug") else []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _crash_params())
def test_crash_regressions(case, device):
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(tests_dir), tests_dir,
                                                       os.environ.get("PYTHONPATH", "")]))
    if is_emulated(device):
        env["CNN_EXT_CUDA_EMULATION"] = "1"
    proc = subprocess.run([sys.executable, "-c", case["code"], device], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, (f"{case['id']}: return code {proc.returncode} (negative: killed by that signal)\n"
                                  f"{case['code']}\n{proc.stderr[-2000:]}")
