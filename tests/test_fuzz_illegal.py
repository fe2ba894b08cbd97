"""Random *illegal* calls of every op, through cnn_ext.functional and torch.ops.cnn_ext directly: each must raise a
Python exception (ValueError, TypeError or RuntimeError), never crash, hang or return.

The cases run in a child process (this file, run as a script), so a segfault or abort in a kernel fails the test with
the offending case named instead of killing pytest. The child prints "CASE <i> <description>" before each call and
"RESULT <i> <outcome>" after it, flushing each line, so even a crash leaves the case that caused it on record. After
every case it also runs a small legal call, so a case that corrupts state (a CUDA context broken by a device-side
assert, say) is caught at the case that did it. Cases come from random.Random(seed): the same every run.

Run by hand:  python tests/test_fuzz_illegal.py --device cpu --cases 600 --seed 0
"""

import os
import random
import subprocess
import sys

import pytest

from _support import DEVICES, is_emulated

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

N_CASES = int(os.environ.get("CNN_EXT_FUZZ_ILLEGAL_CASES", "600"))

# Each random case mutates one legal configuration into an illegal one, in one of these ways.
KINDS = []


def kind(fn):
    KINDS.append(fn)
    return fn


# ---------------------------------------------------------------------------------------------------------------------
# Case generators (run in the child only).
# Each takes (rng, env) and returns (description, thunk). `env` holds torch, the two APIs and tensor makers.
# ---------------------------------------------------------------------------------------------------------------------

HUGE = [2**31, 2**40, 2**62, 2**63 - 1]


def _conv_base(rng):
    """A legal conv2d configuration (kernel fits the unpadded input, so any padding keeps it legal)."""
    g = rng.choice([1, 1, 2, 3])
    c, k = g * rng.randint(1, 3), g * rng.randint(1, 3)
    kh, kw = rng.randint(1, 4), rng.randint(1, 4)
    return dict(n=rng.randint(1, 3), c=c, k=k, h=rng.randint(kh, 9), w=rng.randint(kw, 9), kh=kh, kw=kw, groups=g,
                stride=[rng.randint(1, 3), rng.randint(1, 3)], padding=[rng.randint(0, 2), rng.randint(0, 2)],
                dilation=[1, 1], bias=rng.random() < 0.5)


def _conv_tensors(env, b, dtype=None):
    dtype = dtype or env.float
    x = env.tensor((b["n"], b["c"], b["h"], b["w"]), dtype)
    w = env.tensor((b["k"], b["c"] // b["groups"], b["kh"], b["kw"]), dtype)
    bias = env.tensor((b["k"],), dtype) if b["bias"] else None
    return x, w, bias


def _call_conv(env, api, x, w, bias, b):
    if api == "fn":
        return lambda: env.fn.conv2d(x, w, bias, b["stride"], b["padding"], b["dilation"], b["groups"])
    return lambda: env.ops.conv2d(x, w, bias, b["stride"], b["padding"], b["dilation"], b["groups"])


def _desc(op, api, b, **extra):
    fields = {k: v for k, v in b.items()}
    fields.update(extra)
    return f"{api}.{op} " + " ".join(f"{k}={v}" for k, v in fields.items())


@kind
def conv_bad_rank(rng, env):
    b, api = _conv_base(rng), rng.choice(["fn", "ops"])
    x, w, bias = _conv_tensors(env, b)
    which = rng.choice(["input", "weight"])
    # functional takes a 3-D input (unbatched); the operator takes 4-D only.
    ranks = [0, 1, 2, 5] if (which == "weight" or api == "fn") else [0, 1, 2, 3, 5]
    rank = rng.choice(ranks)
    bad = env.tensor(tuple(rng.randint(1, 4) for _ in range(rank)), env.float)
    if which == "input":
        x = bad
    else:
        w = bad
    return _desc("conv2d", api, b, **{which + "_rank": rank}), _call_conv(env, api, x, w, bias, b)


@kind
def conv_channel_mismatch(rng, env):
    b, api = _conv_base(rng), rng.choice(["fn", "ops"])
    cpg = b["c"] // b["groups"]
    wrong = rng.choice([c for c in range(1, 7) if c != cpg])
    x, _, bias = _conv_tensors(env, b)
    w = env.tensor((b["k"], wrong, b["kh"], b["kw"]), env.float)
    return _desc("conv2d", api, b, weight_in_channels=wrong), _call_conv(env, api, x, w, bias, b)


@kind
def conv_bad_groups(rng, env):
    b, api = _conv_base(rng), rng.choice(["fn", "ops"])
    how = rng.choice(["nonpositive", "c", "k", "huge"])
    x, w, bias = _conv_tensors(env, b)
    if how == "nonpositive":
        b["groups"] = rng.choice([0, -1, -3])
    elif how == "huge":
        b["groups"] = rng.choice(HUGE)
    elif how == "c":  # C not divisible by groups (weight's C/groups is what floor division gives)
        g = rng.randint(2, 4)
        c = g * rng.randint(1, 2) + rng.randint(1, g - 1)
        x = env.tensor((b["n"], c, b["h"], b["w"]), env.float)
        w = env.tensor((g * 2, max(1, c // g), b["kh"], b["kw"]), env.float)
        bias = env.tensor((g * 2,), env.float) if bias is not None else None
        b.update(c=c, k=g * 2, groups=g)
    else:  # K not divisible by groups
        g = rng.randint(2, 4)
        k = g * rng.randint(1, 2) + rng.randint(1, g - 1)
        x = env.tensor((b["n"], g, b["h"], b["w"]), env.float)
        w = env.tensor((k, 1, b["kh"], b["kw"]), env.float)
        bias = env.tensor((k,), env.float) if bias is not None else None
        b.update(c=g, k=k, groups=g)
    return _desc("conv2d", api, b, how=how), _call_conv(env, api, x, w, bias, b)


@kind
def conv_kernel_too_big(rng, env):
    """The dilated kernel is larger than the padded input in one dimension."""
    b, api = _conv_base(rng), rng.choice(["fn", "ops"])
    dim = rng.randint(0, 1)
    k, d = rng.randint(2, 5), rng.randint(1, 3)
    extent = d * (k - 1) + 1
    pad = rng.randint(0, (extent - 2) // 2)
    size = rng.randint(1, extent - 2 * pad - 1)
    b["kh" if dim == 0 else "kw"] = k
    b["h" if dim == 0 else "w"] = size
    b["dilation"][dim] = d
    b["padding"][dim] = pad
    if api == "fn" and pad == 0 and b["padding"][1 - dim] == 0 and rng.random() < 0.5:
        b["padding"] = "valid"
    x, w, bias = _conv_tensors(env, b)
    return _desc("conv2d", api, b), _call_conv(env, api, x, w, bias, b)


@kind
def conv_bad_hyperparameter(rng, env):
    """stride/dilation <= 0, negative padding, pairs of the wrong length, non-int values, 'same' with stride."""
    b, api = _conv_base(rng), rng.choice(["fn", "ops"])
    name = rng.choice(["stride", "padding", "dilation"])
    how = rng.choice(["value", "value", "length", "type"] + (["same"] if api == "fn" else []))
    if how == "value":
        b[name][rng.randint(0, 1)] = rng.choice([-1, -2, -(2**40)] + ([] if name == "padding" else [0]))
    elif how == "length":
        b[name] = [1] * rng.choice([0, 3, 4]) if api == "ops" else [1] * rng.choice([3, 4])
    elif how == "type":
        b[name] = rng.choice([[1.5, 1], [1, "1"], [None, 1], 2.0 if api == "fn" else [2.0, 2.0], "2"])
    else:  # 'same' with a stride other than 1
        b["padding"] = "same"
        b["stride"] = [rng.randint(2, 3), rng.randint(1, 3)]
        rng.shuffle(b["stride"])
        name = "padding"
    x, w, bias = _conv_tensors(env, b)
    return _desc("conv2d", api, b, how=how, arg=name), _call_conv(env, api, x, w, bias, b)


@kind
def conv_bad_dtype(rng, env):
    b, api = _conv_base(rng), rng.choice(["fn", "ops"])
    how = rng.choice(["mismatch", "unsupported"])
    if how == "mismatch":
        d1, d2 = rng.sample(env.float_dtypes, 2)
        b["bias"] = True
        x, w, bias = _conv_tensors(env, b, d1)
        which = rng.choice(["weight", "bias"])
        if which == "weight":
            w = w.to(d2)
        else:
            bias = bias.to(d2)
        return _desc("conv2d", api, b, dtype=d1, mismatched=which, other=d2), _call_conv(env, api, x, w, bias, b)
    dtype = rng.choice(env.unsupported_dtypes)
    x, w, bias = _conv_tensors(env, b, dtype)
    return _desc("conv2d", api, b, dtype=dtype), _call_conv(env, api, x, w, bias, b)


@kind
def conv_bad_bias(rng, env):
    b, api = _conv_base(rng), rng.choice(["fn", "ops"])
    x, w, _ = _conv_tensors(env, b)
    how = rng.choice(["size", "size", "rank0", "rank2"] + (["not a tensor"] if api == "fn" else []))
    if how == "size":
        bias = env.tensor((rng.choice([n for n in range(0, 10) if n != b["k"]]),), env.float)
    elif how == "rank0":
        bias = env.tensor((), env.float)
    elif how == "rank2":
        bias = env.tensor((b["k"], 1), env.float)
    else:
        bias = [0.0] * b["k"]
    return _desc("conv2d", api, b, bias_how=how), _call_conv(env, api, x, w, bias, b)


@kind
def conv_bad_weight_shape(rng, env):
    b, api = _conv_base(rng), rng.choice(["fn", "ops"])
    x, _, bias = _conv_tensors(env, b)
    how = rng.choice(["zero kernel", "huge kernel"])
    if how == "zero kernel":
        shape = [b["k"], b["c"] // b["groups"], b["kh"], b["kw"]]
        shape[rng.randint(2, 3)] = 0
        w = env.tensor(tuple(shape), env.float)
    else:  # a kernel of 2**31 (or more) pixels: an expanded view, so no memory is needed
        big = rng.choice(HUGE[:2])  # 2**62 would overflow even an expanded view's numel
        shape = [b["k"], b["c"] // b["groups"], b["kh"], b["kw"]]
        shape[rng.randint(2, 3)] = big
        w = env.torch.ones((), device=env.device).expand(*shape)
    return _desc("conv2d", api, b, weight_shape=tuple(w.shape)), _call_conv(env, api, x, w, bias, b)


@kind
def conv_huge_hyperparameter(rng, env):
    """Huge stride/padding/dilation that no input satisfies (kernel too large, or an output too large to exist).
    Dilations large enough to overflow dilation*(kernel-1) are in tests/regressions.py instead (a known bug)."""
    b, api = _conv_base(rng), rng.choice(["fn", "ops"])
    how = rng.choice(["stride, kernel too big", "dilation", "padding"])
    if how == "stride, kernel too big":
        b["stride"] = [rng.choice(HUGE), rng.choice(HUGE)]
        b["padding"] = [0, 0]
        b["kh"] = b["h"] + rng.randint(1, 3)
    elif how == "dilation":  # 2**40 * (k-1) does not overflow, but is far larger than the input
        b["kh"] = max(b["kh"], 2)
        b["h"] = max(b["h"], b["kh"])
        b["dilation"] = [2**40, 1]
    else:
        # Padding 2**40 on both sides makes an output of about 2**82 pixels: its size overflows int64. (On one side
        # only, the output "just" needs terabytes, and whether that allocation fails depends on overcommit.)
        # Padding 2**63-1, whose doubling overflows, is in the regression list (a known bug).
        b["padding"] = [rng.choice([2**40, 2**62]) for _ in range(2)]
    x, w, bias = _conv_tensors(env, b)
    return _desc("conv2d", api, b, how=how), _call_conv(env, api, x, w, bias, b)


@kind
def conv_not_a_tensor(rng, env):
    b, api = _conv_base(rng), rng.choice(["fn", "ops"])
    x, w, bias = _conv_tensors(env, b)
    value = rng.choice([None, 1.0, [[1.0]], "x"])
    if rng.random() < 0.5:
        x = value
    else:
        w = value
    return _desc("conv2d", api, b, non_tensor=repr(value)), _call_conv(env, api, x, w, bias, b)


@kind
def conv_device_mismatch(rng, env):
    b, api = _conv_base(rng), rng.choice(["fn", "ops"])
    b["bias"] = True
    x, w, bias = _conv_tensors(env, b)
    which = rng.choice(["weight", "bias"])
    if which == "weight":
        w = w.to("meta")
    else:
        bias = bias.to("meta")
    return _desc("conv2d", api, b, on_meta=which), _call_conv(env, api, x, w, bias, b)


@kind
def conv_backward_bad(rng, env):
    """conv2d_backward_{input,weight,bias} with arguments that do not describe a forward call."""
    b = _conv_base(rng)
    x, w, _ = _conv_tensors(env, b)
    args = (b["stride"], b["padding"], b["dilation"], b["groups"])
    out_shape = tuple(env.fn.conv2d(x, w, None, *args).shape)
    which = rng.choice(["input", "weight", "bias"])
    how = rng.choice(["grad_output shape", "grad_output rank", "size length", "size negative", "size huge",
                      "dtype", "integer grad_output", "groups"])
    go = env.tensor(out_shape, env.float)
    size = list(x.shape) if which == "input" else list(w.shape)
    if how == "grad_output shape":
        shape = list(out_shape)
        shape[rng.randint(0, 3)] += rng.choice([-1, 1, 2]) if min(out_shape) > 1 else rng.choice([1, 2])
        go = env.tensor(tuple(shape), env.float)
    elif how == "grad_output rank":
        go = env.tensor(out_shape[:rng.randint(0, 3)] if rng.random() < 0.5 else out_shape + (1,), env.float)
    elif how == "size length":
        size = size[:rng.randint(0, 3)] if rng.random() < 0.5 else size + [1]
    elif how == "size negative":
        size[rng.randint(0, 3)] = rng.choice([-1, -5, -(2**40)])
    elif how == "size huge":
        size[rng.randint(0, 3)] = rng.choice(HUGE)
    elif how == "dtype":
        go = go.to(rng.choice([d for d in env.float_dtypes if d != env.float]))
    elif how == "integer grad_output":
        go = go.to(rng.choice(env.integer_dtypes))
    else:
        args = args[:3] + (rng.choice([0, -1, 7]),)
    if which == "bias":  # its only argument is grad_output: only a bad rank or dtype is illegal
        go = env.tensor(out_shape[:rng.choice([0, 1, 2, 3])] + (() if rng.random() < 0.5 else (1, 1)), env.float)
        go = go if go.dim() != 4 else go.to(rng.choice(env.integer_dtypes))
        return f"ops.conv2d_backward_bias grad_output={tuple(go.shape)} {go.dtype}", \
            lambda: env.ops.conv2d_backward_bias(go)
    if which == "input":
        return _desc("conv2d_backward_input", "ops", b, how=how, input_size=size), \
            lambda: env.ops.conv2d_backward_input(go, w, size, *args)
    return _desc("conv2d_backward_weight", "ops", b, how=how, weight_size=size), \
        lambda: env.ops.conv2d_backward_weight(go, x, size, *args)


# --- pooling ---------------------------------------------------------------------------------------------------------


def _pool_out_size(size, k, s, p, d, ceil_mode):
    """torch's pooling_output_shape."""
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _pool_base(rng, op):
    k = [rng.randint(1, 4), rng.randint(1, 4)]
    return dict(op=op, n=rng.randint(1, 3), c=rng.randint(1, 4), h=rng.randint(4, 9), w=rng.randint(4, 9),
                kernel=k, stride=[rng.randint(1, 3), rng.randint(1, 3)], padding=[rng.randint(0, ki // 2) for ki in k],
                dilation=[1, 1], ceil_mode=rng.random() < 0.5, count_include_pad=rng.random() < 0.5,
                divisor_override=rng.choice([None, None, 2]))


def _call_pool(env, api, x, b):
    if b["op"] == "max_pool2d":
        if api == "fn":
            return lambda: env.fn.max_pool2d(x, b["kernel"], b["stride"], b["padding"], b["dilation"], b["ceil_mode"])
        return lambda: env.ops.max_pool2d(x, b["kernel"], b["stride"], b["padding"], b["dilation"], b["ceil_mode"])
    if api == "fn":
        return lambda: env.fn.avg_pool2d(x, b["kernel"], b["stride"], b["padding"], b["ceil_mode"],
                                         b["count_include_pad"], b["divisor_override"])
    return lambda: env.ops.avg_pool2d(x, b["kernel"], b["stride"], b["padding"], b["ceil_mode"],
                                      b["count_include_pad"], b["divisor_override"])


def _pool_desc(api, b, **extra):
    fields = dict(b)
    op = fields.pop("op")
    if op == "max_pool2d":
        del fields["count_include_pad"], fields["divisor_override"]
    else:
        del fields["dilation"]
    return _desc(op, api, fields, **extra)


def _pool_input(env, b, dtype=None):
    return env.tensor((b["n"], b["c"], b["h"], b["w"]), dtype or env.float)


def _pool_op(rng):
    return rng.choice(["max_pool2d", "avg_pool2d"])


@kind
def pool_bad_rank(rng, env):
    b, api = _pool_base(rng, _pool_op(rng)), rng.choice(["fn", "ops"])
    rank = rng.choice([0, 1, 2, 5] if api == "fn" else [0, 1, 2, 3, 5])
    x = env.tensor(tuple(rng.randint(1, 5) for _ in range(rank)), env.float)
    return _pool_desc(api, b, input_rank=rank), _call_pool(env, api, x, b)


@kind
def pool_bad_hyperparameter(rng, env):
    """kernel/stride/dilation <= 0, negative padding, padding over half the kernel, wrong lengths or types."""
    b, api = _pool_base(rng, _pool_op(rng)), rng.choice(["fn", "ops"])
    names = ["kernel", "stride", "padding"] + (["dilation"] if b["op"] == "max_pool2d" else [])
    name = rng.choice(names)
    how = rng.choice(["value", "value", "value", "length", "type"])
    dim = rng.randint(0, 1)
    if how == "value":
        if name == "padding":
            b["padding"][dim] = rng.choice([-1, -(2**40), b["kernel"][dim] // 2 + rng.randint(1, 3), 2**40])
        else:
            b[name][dim] = rng.choice([0, -1, -(2**40)])
    elif how == "length":
        # An empty stride means "stride = kernel_size" (torch's default), so it is legal: lengths 3 and 4 only.
        b[name] = [1] * rng.choice([3, 4])
    else:
        b[name] = rng.choice([[1.5, 1], [2, None], "2"] + ([2.5, True] if api == "fn" else []))
    x = _pool_input(env, b)
    return _pool_desc(api, b, how=how, arg=name), _call_pool(env, api, x, b)


@kind
def pool_kernel_too_big(rng, env):
    """No output pixel: the (dilated) window is larger than the padded input, by torch's formula (ceil_mode too)."""
    b, api = _pool_base(rng, _pool_op(rng)), rng.choice(["fn", "ops"])
    dim = rng.randint(0, 1)
    for _ in range(100):
        k = rng.choice([rng.randint(2, 8), rng.choice(HUGE[:3])])
        d = rng.randint(1, 3) if b["op"] == "max_pool2d" and k < 100 else 1
        p = rng.randint(0, min(k // 2, 3))
        s = rng.choice([rng.randint(1, 3), 2**40]) if not b["ceil_mode"] else rng.randint(1, 3)
        size = rng.randint(1, 9)
        if _pool_out_size(size, k, s, p, d, b["ceil_mode"]) < 1:
            break
    else:
        raise AssertionError("no illegal pooling configuration found")
    b["kernel"][dim], b["dilation"][dim], b["padding"][dim], b["stride"][dim] = k, d, p, s
    b["h" if dim == 0 else "w"] = size
    x = _pool_input(env, b)
    return _pool_desc(api, b), _call_pool(env, api, x, b)


@kind
def pool_bad_input(rng, env):
    """Integer/complex/bool (and, on CPU, half) dtypes; zero channels, height or width."""
    b, api = _pool_base(rng, _pool_op(rng)), rng.choice(["fn", "ops"])
    if rng.random() < 0.5:
        dtype = rng.choice(env.unsupported_dtypes)
        return _pool_desc(api, b, dtype=dtype), _call_pool(env, api, _pool_input(env, b, dtype), b)
    b[rng.choice(["c", "h", "w"])] = 0
    return _pool_desc(api, b), _call_pool(env, api, _pool_input(env, b), b)


@kind
def pool_not_a_tensor(rng, env):
    b, api = _pool_base(rng, _pool_op(rng)), rng.choice(["fn", "ops"])
    value = rng.choice([None, 1.0, [[[1.0]]], "x"])
    return _pool_desc(api, b, input=repr(value)), _call_pool(env, api, value, b)


@kind
def avg_pool_bad_divisor(rng, env):
    b, api = _pool_base(rng, "avg_pool2d"), rng.choice(["fn", "ops"])
    b["divisor_override"] = rng.choice([0, 0, 1.5, "2"] + ([True] if api == "fn" else []))
    return _pool_desc(api, b), _call_pool(env, api, _pool_input(env, b), b)


@kind
def max_pool_backward_bad(rng, env):
    """max_pool2d_backward with indices or grad_output that its forward could not have produced."""
    b = _pool_base(rng, "max_pool2d")
    x = _pool_input(env, b)
    args = (b["kernel"], b["stride"], b["padding"], b["dilation"], b["ceil_mode"])
    out, idx = env.ops.max_pool2d(x, *args)
    go, size = env.tensor(tuple(out.shape), env.float), list(x.shape)
    plane = b["h"] * b["w"]
    how = rng.choice(["index out of range", "index out of range", "index dtype", "index shape", "index device",
                      "grad_output shape", "grad_output dtype", "input_size", "hyperparameter"])
    if how == "index out of range":
        # -1 marks a window wholly in padding (legal); anything else outside [0, H*W) is not.
        bad = rng.choice([plane, plane + rng.randint(1, 100), -2, -(2**62), 2**62, 2**63 - 1, -(2**63)])
        idx = idx.clone()
        idx.view(-1)[rng.randrange(idx.numel())] = bad
        detail = bad
    elif how == "index dtype":
        detail = rng.choice([env.torch.int32, env.torch.int16, env.torch.uint8, env.float])
        idx = idx.to(detail)
    elif how == "index shape":
        detail = rng.choice(["short", "long", "3-D", "5-D"])
        if detail == "short":
            idx = idx[..., :-1] if idx.shape[-1] > 1 else idx[:, :0]
        elif detail == "long":
            idx = env.torch.cat([idx, idx[:, :1]], dim=1)
        elif detail == "3-D":
            idx = idx[0]
        else:
            idx = idx.unsqueeze(0)
    elif how == "index device":
        idx, detail = idx.to("meta"), "meta"
    elif how == "grad_output shape":
        shape = list(out.shape)
        shape[rng.randint(0, 3)] += 1
        go, detail = env.tensor(tuple(shape), env.float), shape
    elif how == "grad_output dtype":
        detail = rng.choice(env.unsupported_dtypes)
        go = go.to(detail)
    elif how == "input_size":
        detail = rng.choice(["length", "negative", "zero channels", "huge"])
        if detail == "length":
            size = size[:3] if rng.random() < 0.5 else size + [1]
        elif detail == "negative":
            size[rng.randint(0, 3)] = -1
        elif detail == "zero channels":
            size[rng.randint(1, 3)] = 0
        else:
            size[rng.randint(2, 3)] = rng.choice(HUGE)
    else:
        detail = rng.choice(["stride 0", "padding over half"])
        args = (b["kernel"], [0, 1], *args[2:]) if detail == "stride 0" else \
            (b["kernel"], b["stride"], [b["kernel"][0] // 2 + 1, 0], *args[3:])
    return _desc("max_pool2d_backward", "ops", b, how=how, detail=detail, input_size=size), \
        lambda: env.ops.max_pool2d_backward(go, idx, size, *args)


@kind
def avg_pool_backward_bad(rng, env):
    b = _pool_base(rng, "avg_pool2d")
    x = _pool_input(env, b)
    args = [b["kernel"], b["stride"], b["padding"], b["ceil_mode"], b["count_include_pad"], b["divisor_override"]]
    out = env.ops.avg_pool2d(x, *args)
    go, size = env.tensor(tuple(out.shape), env.float), list(x.shape)
    how = rng.choice(["grad_output shape", "grad_output rank", "grad_output dtype", "input_size length",
                      "input_size negative", "input_size huge", "divisor 0", "kernel 0", "padding over half"])
    if how == "grad_output shape":
        shape = list(out.shape)
        shape[rng.randint(0, 3)] += rng.choice([1, 3])
        go = env.tensor(tuple(shape), env.float)
    elif how == "grad_output rank":
        go = go[0] if rng.random() < 0.5 else go.unsqueeze(0)
    elif how == "grad_output dtype":
        go = go.to(rng.choice(env.unsupported_dtypes))
    elif how == "input_size length":
        size = size[:rng.randint(0, 3)] if rng.random() < 0.5 else size + [1]
    elif how == "input_size negative":
        size[rng.randint(0, 3)] = rng.choice([-1, -(2**40)])
    elif how == "input_size huge":
        size[rng.randint(2, 3)] = rng.choice(HUGE)
    elif how == "divisor 0":
        args[5] = 0
    elif how == "kernel 0":
        args[0] = [0, b["kernel"][1]]
    else:
        args[2] = [b["kernel"][0] // 2 + 1, 0]
    return _desc("avg_pool2d_backward", "ops", b, how=how, input_size=size), \
        lambda: env.ops.avg_pool2d_backward(go, size, *args)


# ---------------------------------------------------------------------------------------------------------------------
# The fused conv2d + max_pool2d + ReLU.
# ---------------------------------------------------------------------------------------------------------------------


def _fused_base(rng):
    """A legal fused configuration: a legal convolution whose output a 1x1 or 2x2 pooling window fits."""
    b = _conv_base(rng)
    b.update(padding=[max(p, 1) for p in b["padding"]], stride=[1, 1])  # a conv output of at least 2 x 2
    b["pool"] = dict(kernel=[rng.randint(1, 2), rng.randint(1, 2)], stride=[rng.randint(1, 2), rng.randint(1, 2)],
                     padding=[0, 0], dilation=[1, 1], ceil_mode=rng.random() < 0.5)
    return b


def _call_fused(env, api, x, w, bias, b):
    p = b["pool"]
    if api == "fn":
        return lambda: env.fn.conv2d_maxpool_relu(x, w, bias, b["stride"], b["padding"], b["dilation"], b["groups"],
                                                  p["kernel"], p["stride"], p["padding"], p["dilation"],
                                                  p["ceil_mode"])
    return lambda: env.ops.conv2d_maxpool_relu(x, w, bias, b["stride"], b["padding"], b["dilation"], b["groups"],
                                               p["kernel"], p["stride"], p["padding"], p["dilation"], p["ceil_mode"])


@kind
def fused_bad_arguments(rng, env):
    """The fused op with a bad convolution (channels, groups, dtype) or a bad pooling (kernel, stride or dilation
    <= 0, padding over half the window, a window larger than the padded convolution output)."""
    b, api = _fused_base(rng), rng.choice(["fn", "ops"])
    x, w, bias = _conv_tensors(env, b)
    how = rng.choice(["channels", "groups", "dtype", "pool kernel", "pool stride", "pool dilation",
                      "pool padding", "pool window too big"])
    p = b["pool"]
    if how == "channels":
        w = env.tensor((b["k"], b["c"] // b["groups"] + 1, b["kh"], b["kw"]), env.float)
    elif how == "groups":
        b["groups"] = rng.choice([0, -1, b["c"] + 1])
    elif how == "dtype":
        dtype = rng.choice(env.unsupported_dtypes)
        x, w, bias = _conv_tensors(env, b, dtype)
    elif how in ("pool kernel", "pool stride", "pool dilation"):
        p[how.split()[1]][rng.randint(0, 1)] = rng.choice([0, -1])
    elif how == "pool padding":
        p["padding"] = [p["kernel"][0] // 2 + 1, 0]
    else:
        p["kernel"] = [b["h"] + 2 * b["padding"][0] + rng.randint(1, 5), 1]
    return _desc("conv2d_maxpool_relu", api, b, how=how), _call_fused(env, api, x, w, bias, b)


@kind
def fused_backward_bad(rng, env):
    """conv2d_maxpool_relu_backward(_pool) with indices, output or grad_output its forward could not have made."""
    b = _fused_base(rng)
    x, w, bias = _conv_tensors(env, b)
    p = b["pool"]
    conv = (b["stride"], b["padding"], b["dilation"], b["groups"])
    pool = (p["kernel"], p["stride"], p["padding"], p["dilation"], p["ceil_mode"])
    out, idx = env.ops.conv2d_maxpool_relu(x, w, bias, *conv, *pool)
    go = env.tensor(tuple(out.shape), env.float)
    how = rng.choice(["index out of range", "index dtype", "output shape", "grad_output dtype", "pool stride 0"])
    if how == "index out of range":
        idx = idx.clone()
        idx.view(-1)[rng.randrange(idx.numel())] = rng.choice([-2, 2**40, -(2**63)])
    elif how == "index dtype":
        idx = idx.to(env.torch.int32)
    elif how == "output shape":
        out = out[..., :-1] if out.shape[-1] > 1 else env.torch.cat([out, out], dim=-1)
    elif how == "grad_output dtype":
        go = go.to(rng.choice(env.unsupported_dtypes))
    else:
        pool = (p["kernel"], [0, 1], *pool[2:])
    op = rng.choice(["conv2d_maxpool_relu_backward", "conv2d_maxpool_relu_backward_pool"])
    mask = ([True, True, True],) if op == "conv2d_maxpool_relu_backward" else ()
    return _desc(op, "ops", b, how=how), \
        lambda: getattr(env.ops, op)(go, out, idx, x, w, *conv, *pool, *mask)


def generate(seed, count, env):
    """`count` cases, the kinds taking turns (so every kind gets its share), parameters from Random(seed)."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        make = KINDS[i % len(KINDS)]
        desc, call = make(rng, env)
        cases.append((f"[{make.__name__}] {desc}", call))
    return cases


# ---------------------------------------------------------------------------------------------------------------------
# Regressions: illegal calls that once did not raise (see tests/regressions.py).
# ---------------------------------------------------------------------------------------------------------------------


def regression_cases(env):
    import regressions

    return [(f"{case['id']}: {case['call_text']}", lambda case=case: case["call"](env.device))
            for case in regressions.ILLEGAL]


# ---------------------------------------------------------------------------------------------------------------------
# The child: run every case, one line per outcome.
# ---------------------------------------------------------------------------------------------------------------------


class Env:
    """What the case generators use: torch, both APIs, the device and a tensor maker (built in the child only)."""

    def __init__(self, device):
        import torch

        import cnn_ext

        # "emulated": CPU tensors, served by the CUDA kernels on the CPU emulator.
        cuda_kernels = device in ("cuda", "emulated")
        if device == "emulated":
            cnn_ext.cuda_emulation.enable()
            device = "cpu"
        self.torch, self.fn, self.ops, self.device = torch, cnn_ext.functional, torch.ops.cnn_ext, device
        self.float = torch.float32
        half = [torch.float16, torch.bfloat16]
        self.float_dtypes = [torch.float32, torch.float64] + (half if cuda_kernels else [])
        self.integer_dtypes = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool]
        # Dtypes no kernel of this device takes: integers and complex; half precision has CUDA kernels only.
        self.unsupported_dtypes = self.integer_dtypes + [torch.complex64] + ([] if cuda_kernels else half)
        self.gen = torch.Generator().manual_seed(0)

    def tensor(self, shape, dtype):
        t = self.torch.randn(shape, generator=self.gen, dtype=self.torch.float64)
        if dtype.is_complex:
            return t.to(dtype).to(self.device)
        return (t * 3).to(dtype).to(self.device)


def main(argv):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "emulated"])
    parser.add_argument("--cases", type=int, default=N_CASES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--regressions", action="store_true", help="then run tests/regressions.py's cases")
    opts = parser.parse_args(argv)

    env = Env(opts.device)
    torch = env.torch
    cases = generate(opts.seed, opts.cases, env) + (regression_cases(env) if opts.regressions else [])
    x_ok, w_ok = env.tensor((1, 2, 5, 5), env.float), env.tensor((3, 2, 3, 3), env.float)
    expected = torch.nn.functional.conv2d(x_ok, w_ok, padding=1)

    def sync():
        if opts.device == "cuda":
            torch.cuda.synchronize()  # so an asynchronous CUDA error is charged to the call that made it

    for i, (desc, call) in enumerate(cases):
        print(f"CASE {i} {desc}", flush=True)
        try:
            result = call()
            sync()
            outcome = f"NO ERROR, returned {type(result).__name__}"
        except Exception as e:  # noqa: BLE001 (which exception it is gets reported, and checked by the parent)
            message = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            # Subclasses count (torch's NotImplementedError is a RuntimeError); anything else is reported as such.
            verdict = "raised" if isinstance(e, (ValueError, TypeError, RuntimeError)) else "raised disallowed"
            outcome = f"{verdict} {type(e).__name__}: {message}"
        # A legal call must still work: nothing the illegal one did may have broken the process.
        try:
            ok = torch.allclose(env.fn.conv2d(x_ok, w_ok, padding=1), expected, atol=1e-4)
            sync()
            if not ok:
                outcome += " | AFTER IT: a legal conv2d gives a wrong result"
        except Exception as e:  # noqa: BLE001
            outcome += f" | AFTER IT: a legal conv2d raised {type(e).__name__}: {e}"
        print(f"RESULT {i} {outcome}", flush=True)
    print(f"DONE {len(cases)}", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# The tests (parent side).
# ---------------------------------------------------------------------------------------------------------------------


def run_child(*args, timeout=300):
    """Run this file as a child; return (return code, {case index: [description, outcome]}, stdout, stderr).
    A child that hangs is killed after `timeout` seconds and reported like a crash (return code -9)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # our own child, by its handle
        stdout, stderr = proc.communicate()
        stderr += f"\n(killed after {timeout} s: it hung)"
    cases = {}
    for line in stdout.splitlines():
        tag, _, rest = line.partition(" ")
        index, _, text = rest.partition(" ")
        if tag == "CASE":
            cases[int(index)] = [text, None]
        elif tag == "RESULT":
            cases[int(index)][1] = text
    return proc.returncode, cases, stdout, stderr


def _raised_as_it_should(outcome):
    return outcome.startswith("raised ") and not outcome.startswith("raised disallowed") and "AFTER IT" not in outcome


def check_outcomes(returncode, cases, stdout, stderr, expected_count):
    if returncode != 0:
        unfinished = [f"#{i}: {desc}" for i, (desc, outcome) in cases.items() if outcome is None]
        pytest.fail(f"the child process died (return code {returncode}; negative = killed by that signal) "
                    f"while running {unfinished or 'no case'}\nstderr tail:\n{stderr[-3000:]}")
    if expected_count is not None:
        assert len(cases) == expected_count, stdout[-2000:]
    bad = [f"#{i}: {desc}\n    -> {outcome}" for i, (desc, outcome) in cases.items()
           if not _raised_as_it_should(outcome)]
    assert not bad, f"{len(bad)} of {len(cases)} illegal calls did not raise as they should:\n" + "\n".join(bad)


@pytest.fixture(scope="module")
def child_outcomes():
    """Runs the child once per device (random cases, then tests/regressions.py's) and caches what it reported:
    one torch import per device instead of one per test."""
    results = {}

    def run(device):
        name = "emulated" if is_emulated(device) else str(device)
        if name not in results:
            results[name] = run_child("--device", name, "--cases", str(N_CASES), "--seed", "0", "--regressions")
        return results[name]

    return run


@pytest.mark.parametrize("device", DEVICES)
def test_illegal_calls_raise(device, child_outcomes):
    """N_CASES random illegal calls (600 by default; CNN_EXT_FUZZ_ILLEGAL_CASES changes it), each raising."""
    returncode, cases, stdout, stderr = child_outcomes(device)
    check_outcomes(returncode, {i: c for i, c in cases.items() if i < N_CASES}, stdout, stderr, N_CASES)


def test_every_kind_is_generated():
    """The kinds take turns, so any count of at least len(KINDS) covers every kind of illegal call."""
    assert N_CASES >= 500 and N_CASES >= len(KINDS)


def _regression_params():
    import regressions

    # An open bug is a strict xfail on its assertion only: a crash of the child (pytest.fail) still fails.
    marks = [[pytest.mark.xfail(strict=True, raises=AssertionError, reason=case["bug"])] if case.get("bug") else []
             for case in regressions.ILLEGAL]
    return [pytest.param(i, id=case["id"], marks=m) for i, (case, m) in enumerate(zip(regressions.ILLEGAL, marks))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", _regression_params())
def test_illegal_regressions(index, device, child_outcomes):
    """Illegal calls the fuzzers found not raising. Open bugs are strict xfails: fixing one makes its test fail
    until its `bug` entry in tests/regressions.py is removed."""
    returncode, cases, stdout, stderr = child_outcomes(device)
    if returncode != 0:  # a crash in one regression case must not hide behind the others' xfails
        check_outcomes(returncode, cases, stdout, stderr, None)
    desc, outcome = cases[N_CASES + index]
    assert _raised_as_it_should(outcome), \
        f"{desc}\n    -> {outcome}"


if __name__ == "__main__":
    main(sys.argv[1:])
