"""Batch normalisation (cnn_ext.functional.batch_norm and batch_norm_relu, cnn_ext.nn.BatchNorm2d and
BatchNormReLU2d, the ops batch_norm, batch_norm_relu and batch_norm_backward): output, running statistics and every
gradient against torch's (followed by torch's ReLU for the fused form), on every ISA, in training and evaluation, with
and without affine parameters; NaNs through the fused ReLU; bitwise independence of the thread count; opcheck;
argument errors."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import cnn_ext
from _support import assert_close, batch_norm_case as _case, grads
from cnn_ext import cpu_dispatch

ops = torch.ops.cnn_ext
ISAS = cpu_dispatch.available_isas()

SHAPES = {
    "deep_layer": (16, 8, 14, 14),
    "odd_planes": (3, 5, 7, 9),  # 63 values per plane: vector body and scalar tail
    "long_planes": (2, 3, 40, 33),  # 1320 per plane: several 512-value blocks and a partial one
    "one_image": (1, 4, 6, 5),
    "matrix": (10, 6),  # (N, C): F.batch_norm's 2-D form
    "sequence": (4, 3, 17),
    "one_value_per_plane": (5, 7, 1, 1),
}


def _check(shape, dtype, training, affine=True, momentum=0.1, mean=2.0, spread=3.0, seed=0, relu=False):
    g = torch.Generator().manual_seed(seed)
    x, w, b, (rm, rv) = _case(shape, dtype, g, mean, spread, affine)
    ours_rm, ours_rv = rm.clone(), rv.clone()
    ours = cnn_ext.functional.batch_norm_relu if relu else cnn_ext.functional.batch_norm
    out = ours(x, ours_rm, ours_rv, w, b, training, momentum, 1e-5)
    ref = F.batch_norm(x, rm, rv, w, b, training, momentum, 1e-5)
    if relu:
        ref = F.relu(ref)
    assert_close(out, ref, dtype, msg="forward")
    assert_close(ours_rm, rm, dtype, msg="running_mean")
    assert_close(ours_rv, rv, dtype, msg="running_var")
    grad_out = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    values = x.numel() // shape[1]
    for name, got, want in zip(("input", "weight", "bias"), grads(out, [x, w, b], grad_out),
                               grads(ref, [x, w, b], grad_out)):
        if want is not None:
            assert_close(got, want, dtype, scale=1.0 if name == "input" else values ** 0.5, msg=f"grad {name}")


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_torch(shape, isa, training, dtype, relu):
    if training and shape[0] * (torch.Size(shape[2:]).numel()) == 1:
        pytest.skip("one value per channel: training is an error (test_errors)")
    with cpu_dispatch.forced(isa=isa):
        _check(shape, dtype, training, relu=relu)
        _check(shape, dtype, training, affine=False, seed=1, relu=relu)


@pytest.mark.parametrize("isa", ISAS)
def test_relu_passes_nans_as_torch(isa):
    """A NaN input comes out NaN (torch.relu keeps it) and its gradient flows back (threshold_backward clamps only
    outputs <= 0); a NaN gradient where the output was clamped to 0 does not. Evaluation mode, so one NaN does not
    make the whole channel's statistics NaN."""
    g = torch.Generator().manual_seed(3)
    x, w, b, (rm, rv) = _case((2, 3, 5, 37), torch.float32, g)  # 37 per row: the vector body and its scalar tail
    with torch.no_grad():
        x[0, 1, 2, 3] = x[1, 2, 4, 36] = float("nan")
    grad_out = torch.randn(x.shape, generator=g)
    ref = F.relu(F.batch_norm(x, rm, rv, w, b, False))
    grad_out[ref.detach() == 0] = float("nan")
    with cpu_dispatch.forced(isa=isa):
        out = cnn_ext.functional.batch_norm_relu(x, rm, rv, w, b, False)
        got = grads(out, [x, w, b], grad_out)
    torch.testing.assert_close(out, ref, equal_nan=True)
    for name, a, e in zip(("input", "weight", "bias"), got, grads(ref, [x, w, b], grad_out)):
        torch.testing.assert_close(a, e, equal_nan=True, msg=f"grad {name}")
    assert not got[0].isnan().any() and got[0][0, 1, 2, 3] != 0


# Channels whose mean is large against their spread (300 ± 0.05): float32 inputs resolve the spread only to ~6e-4, so
# ours and torch's float32 outputs are compared with the exact (float64) normalisation of the same inputs, where ours
# must be as close as torch's; the two-pass variance (csrc/cpu/batch_norm.cpp) keeps it so, where a one-pass
# E[x²] - mean² would lose the spread altogether. float64 matches torch to the usual tolerance.
def test_large_mean_small_spread():
    _check((8, 4, 12, 12), torch.float64, True, mean=300.0, spread=0.05)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn((8, 4, 12, 12), generator=g, dtype=torch.float64) * 0.05 + 300).float()
    exact = F.batch_norm(x.double(), None, None, training=True)
    ours = cnn_ext.functional.batch_norm(x, None, None, training=True)
    theirs = F.batch_norm(x, None, None, training=True)
    ours_error, torch_error = (ours.double() - exact).abs().max(), (theirs.double() - exact).abs().max()
    assert ours_error <= max(torch_error, 1e-5), (ours_error, torch_error)
    _, mean, var = ops.batch_norm(x, None, None, None, None, True, 1e-5)
    torch.testing.assert_close(mean.double(), x.double().mean((0, 2, 3)), rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), x.double().var((0, 2, 3), unbiased=False), rtol=1e-5, atol=0)


def test_thread_count_does_not_change_results():
    g = torch.Generator().manual_seed(4)
    x, w, b, _ = _case((6, 9, 13, 13), torch.float32, g)
    grad_out = torch.randn(x.shape, generator=g)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out, mean, var = ops.batch_norm(x.detach(), w.detach(), b.detach(), None, None, True, 1e-5)
            results.append((out, mean, var, *ops.batch_norm_backward(grad_out, x.detach(), w.detach(), mean, var,
                                                                     True, 1e-5, [True, True, True])))
            out, mean, var, kept = ops.batch_norm_relu(x.detach(), w.detach(), b.detach(), None, None, True,
                                                           1e-5)
            results[-1] += (out, kept, *ops.batch_norm_backward(grad_out, x.detach(), w.detach(), mean, var,
                                                                    True, 1e-5, [True, True, True], kept))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, e) for a, e in zip(other, results[0]))


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("track_running_stats", [True, False], ids=["tracked", "untracked"])
def test_module_matches_torch(momentum, track_running_stats):
    torch.manual_seed(0)
    theirs = torch.nn.BatchNorm2d(6, momentum=momentum, track_running_stats=track_running_stats).double()
    with torch.no_grad():
        theirs.weight.normal_(1, 0.5)
        theirs.bias.normal_()
    ours = cnn_ext.nn.BatchNorm2d(6, momentum=momentum, track_running_stats=track_running_stats).double()
    ours.load_state_dict(theirs.state_dict())
    for step in range(3):
        x = torch.randn(4, 6, 5, 5, dtype=torch.float64) * 2 + step
        for module in (theirs, ours):
            module.train()
        assert_close(ours(x), theirs(x), torch.float64, msg=f"train step {step}")
    for module in (theirs, ours):
        module.eval()
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    assert_close(ours(x), theirs(x), torch.float64, msg="eval")
    for key, value in theirs.state_dict().items():
        assert_close(ours.state_dict()[key].double(), value.double(), torch.float64, msg=key)
    assert isinstance(ours, torch.nn.BatchNorm2d)
    copy.deepcopy(ours).load_state_dict(theirs.state_dict())


def test_relu_module_matches_torch():
    """BatchNormReLU2d against torch's BatchNorm2d then ReLU, sharing one state_dict; cnn_ext.nn.batch_norm_relu
    runs our BatchNorm2d fused and torch's as its two layers."""
    torch.manual_seed(0)
    theirs = torch.nn.BatchNorm2d(6).double()
    with torch.no_grad():
        theirs.weight.normal_(1, 0.5)
        theirs.bias.normal_()
    ours = cnn_ext.nn.BatchNormReLU2d(6).double()
    ours.load_state_dict(theirs.state_dict())
    plain = cnn_ext.nn.BatchNorm2d(6).double()
    plain.load_state_dict(theirs.state_dict())
    for step in range(3):
        x = torch.randn(4, 6, 5, 5, dtype=torch.float64) * 2 + step
        expected = torch.relu(theirs(x))
        assert_close(ours(x), expected, torch.float64, msg=f"train step {step}")
        assert_close(cnn_ext.nn.batch_norm_relu(plain, x), expected, torch.float64, msg=f"helper, step {step}")
    for key, value in theirs.state_dict().items():
        assert_close(ours.state_dict()[key].double(), value.double(), torch.float64, msg=key)
        assert_close(plain.state_dict()[key].double(), value.double(), torch.float64, msg=key)
    ours.eval()
    theirs.eval()
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    assert_close(ours(x), torch.relu(theirs(x)), torch.float64, msg="eval")
    assert torch.equal(cnn_ext.nn.batch_norm_relu(theirs, x), torch.relu(theirs(x)))
    assert isinstance(ours, torch.nn.BatchNorm2d)


def test_empty_batch_leaves_running_statistics():
    rm, rv = torch.zeros(3) + 0.5, torch.ones(3) * 2
    out = cnn_ext.functional.batch_norm(torch.randn(0, 3, 4, 4), rm, rv, training=True)
    assert out.shape == (0, 3, 4, 4)
    assert torch.equal(rm, torch.zeros(3) + 0.5) and torch.equal(rv, torch.ones(3) * 2)


def test_other_devices_and_dtypes_use_torch():
    x = torch.randn(4, 3, 5, 5, dtype=torch.bfloat16)
    assert torch.equal(cnn_ext.functional.batch_norm(x, None, None, training=True),
                       F.batch_norm(x, None, None, training=True))


def test_convert_keeps_our_batch_norms_as_layers():
    """cnn_ext.convert traces a model holding our batch norms (DeepMNIST's ext backend) without entering them: it
    used to warn that torch.fx could not trace the model and leave it unfused."""
    from cnn_ext.app.models import DeepMNIST

    model = DeepMNIST("ext").eval()
    x = torch.randn(2, 1, 28, 28)
    expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = cnn_ext.convert(model)
    assert torch.equal(converted(x), expected)


def _opcheck_samples():
    g = torch.Generator().manual_seed(0)
    x, w, b, (rm, rv) = _case((3, 4, 5, 6), torch.float64, g)
    out, mean, var = ops.batch_norm(x, w, b, rm, rv, True, 1e-5)
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    kept = ops.batch_norm_relu(x, w, b, rm, rv, True, 1e-5)[3]
    return [
        (ops.batch_norm_relu, (x, w, b, rm, rv, True, 1e-5)),
        (ops.batch_norm_relu, (x, None, None, rm, rv, False, 1e-5)),
        (ops.batch_norm_backward, (gy, x.detach(), w.detach(), mean, var, True, 1e-5, [True, True, True], kept)),
        (ops.batch_norm, (x, w, b, rm, rv, True, 1e-5)),
        (ops.batch_norm, (x, None, None, None, None, True, 1e-3)),
        (ops.batch_norm, (x, w, b, rm, rv, False, 1e-5)),
        (ops.batch_norm_backward, (gy, x.detach(), w.detach(), mean, var, True, 1e-5, [True, True, True])),
        (ops.batch_norm_backward, (gy, x.detach(), None, mean, var, False, 1e-5, [True, False, False])),
    ]


@pytest.mark.parametrize("index", range(8))
def test_opcheck(index):
    op, args = _opcheck_samples()[index]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", ["batch_norm", "batch_norm_relu"])
def test_double_backward_refused(name):
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    out = getattr(cnn_ext.functional, name)(x, None, None, training=True)
    with pytest.raises(RuntimeError, match=f"cnn_ext.{name}: double backward"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)


ERRORS = [
    (lambda x, c: ops.batch_norm(x[0, 0, 0], None, None, None, None, True, 1e-5), ValueError, "at least 2"),
    (lambda x, c: ops.batch_norm(x, torch.ones(c + 1), None, None, None, True, 1e-5), ValueError, "weight must be"),
    (lambda x, c: ops.batch_norm(x, None, torch.ones(c).double(), None, None, True, 1e-5), TypeError, "bias has"),
    (lambda x, c: ops.batch_norm(x, None, None, torch.zeros(c, 1), None, False, 1e-5), ValueError,
     "running_mean must be"),
    (lambda x, c: ops.batch_norm(x, None, None, None, None, False, 1e-5), ValueError, "required when training"),
    (lambda x, c: ops.batch_norm(x, None, None, None, None, True, -1.0), ValueError, "eps"),
    (lambda x, c: ops.batch_norm(x[:1, :, :1, :1], None, None, None, None, True, 1e-5), ValueError,
     "one value per channel"),
    (lambda x, c: ops.batch_norm(x.int(), None, None, None, None, True, 1e-5), TypeError, "floating-point"),
    (lambda x, c: ops.batch_norm(x.half(), None, None, None, None, True, 1e-5), TypeError, "CPU kernels"),
    (lambda x, c: ops.batch_norm_backward(x[:1], x, None, torch.zeros(c), torch.ones(c), True, 1e-5,
                                          [True, True, True]), ValueError, "grad_output has shape"),
    (lambda x, c: ops.batch_norm_backward(x, x, None, torch.zeros(c + 1), torch.ones(c), True, 1e-5,
                                          [True, True, True]), ValueError, "mean must be"),
    (lambda x, c: ops.batch_norm_relu(x, None, None, None, None, False, 1e-5), ValueError, "required when training"),
    (lambda x, c: ops.batch_norm_backward(x, x, None, torch.zeros(c), torch.ones(c), True, 1e-5, [True, True, True],
                                          (x > 0).float()), TypeError, "kept must be a bool tensor"),
    (lambda x, c: ops.batch_norm_backward(x, x, None, torch.zeros(c), torch.ones(c), True, 1e-5, [True, True, True],
                                          x[:1] > 0), ValueError, "kept has shape"),
]


@pytest.mark.parametrize("index", range(len(ERRORS)))
def test_errors(index):
    call, error, message = ERRORS[index]
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(error, match=message):
        call(x, 3)
