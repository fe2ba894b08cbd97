"""The fused batch norm + ReLU + max-pooling (cnn_ext.functional.batch_norm_relu_max_pool2d, cnn_ext.nn's
batch_norm_relu_max_pool helper, the ops batch_norm_relu_max_pool2d and its backward): output, running statistics
and every gradient against torch's three layers, and bit for bit against cnn_ext's own batch_norm_relu and
max_pool2d, on every ISA and every max-pool kernel, in training and evaluation; NaNs; overlapping and padded
windows; bitwise independence of the thread count; DeepMNIST's use of it; opcheck; argument errors."""

import pytest
import torch
import torch.nn.functional as F

import cnn_ext
from _support import assert_close, batch_norm_case, grads
from cnn_ext import cpu_dispatch

ops = torch.ops.cnn_ext
ISAS = cpu_dispatch.available_isas()

# (input shape, (kernel_size, stride, padding, dilation, ceil_mode))
CASES = {
    "deep_28": ((4, 6, 28, 28), (2, 2, 0, 1, False)),  # DeepMNIST's first pooling: 14 windows a row
    "deep_14": ((5, 3, 14, 14), (2, 2, 0, 1, False)),  # its second: 7 windows a row, a vector's tail
    "odd_planes": ((3, 4, 9, 11), (2, 2, 0, 1, False)),  # a column and a row left over
    "ceil": ((2, 3, 9, 11), (2, 2, 0, 1, True)),  # clipped last windows
    "resnet_stem": ((2, 5, 16, 15), (3, 2, 1, 1, False)),  # overlapping, padded windows: shared winners
    "overlap_s1": ((2, 3, 7, 8), (2, 1, 0, 1, False)),
    "dilated": ((2, 3, 10, 9), (3, (2, 1), 1, 2, True)),
    "rect": ((3, 2, 12, 10), ((2, 3), (2, 3), (1, 0), 1, False)),
    "long_planes": ((2, 2, 40, 34), (2, 2, 0, 1, False)),  # 1360 values a plane: several sum blocks
}


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


def _check(shape, pool, dtype, training, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w, b, (rm, rv) = batch_norm_case(shape, dtype, g, mean=1.0, affine=affine)
    # Ours fused, torch's three layers, ours as two ops (batch_norm_relu, then max_pool2d): each on its own leaves.
    fused_rm, fused_rv, torch_rm, torch_rv, split_rm, split_rv = rm.clone(), rv.clone(), rm, rv, rm.clone(), rv.clone()
    out = cnn_ext.functional.batch_norm_relu_max_pool2d(x, fused_rm, fused_rv, w, b, training, 0.1, 1e-5, *pool)
    tx, tw, tb = _leaves(x, w, b)
    ref = F.max_pool2d(F.relu(F.batch_norm(tx, torch_rm, torch_rv, tw, tb, training, 0.1, 1e-5)), *pool)
    sx, sw, sb = _leaves(x, w, b)
    split = cnn_ext.functional.max_pool2d(
        cnn_ext.functional.batch_norm_relu(sx, split_rm, split_rv, sw, sb, training, 0.1, 1e-5), *pool)
    assert_close(out, ref, dtype, msg="forward")
    assert_close(fused_rm, torch_rm, dtype, msg="running_mean")
    assert_close(fused_rv, torch_rv, dtype, msg="running_var")
    assert torch.equal(out, split), "forward: not the bits of batch_norm_relu then max_pool2d"
    assert torch.equal(fused_rm, split_rm) and torch.equal(fused_rv, split_rv)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
    values = x.numel() // shape[1]
    got = grads(out, [x, w, b], grad_out)
    for name, a, want, bits in zip(("input", "weight", "bias"), got, grads(ref, [tx, tw, tb], grad_out),
                                   grads(split, [sx, sw, sb], grad_out)):
        if want is not None:
            assert_close(a, want, dtype, scale=1.0 if name == "input" else values ** 0.5, msg=f"grad {name}")
            assert torch.equal(a, bits), f"grad {name}: not the bits of the two ops' backwards"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_torch(case, isa, training, dtype):
    shape, pool = case
    with cpu_dispatch.forced(isa=isa):
        _check(shape, pool, dtype, training)
        _check(shape, pool, dtype, training, affine=False, seed=1)


@pytest.mark.parametrize("algorithm", ["tiled_2x2", "fixed_window", "general"])
@pytest.mark.parametrize("shape", [(3, 4, 28, 28), (2, 3, 14, 14), (2, 2, 6, 18)], ids=["28", "14", "wide"])
def test_every_max_pool_kernel(shape, algorithm):
    """Each max-pool kernel the dispatch table holds for 2x2 windows, forced (MaxPoolRows), pooling the buffered
    planes: the tiled kernel's vectors run past a plane's last row pair into the buffers' room."""
    with cpu_dispatch.forced(max_pool_forward=algorithm), cpu_dispatch.recording() as calls:
        _check(shape, (2, 2, 0, 1, False), torch.float32, True)
    assert {call[1] for call in calls if call[0] == "max_pool_forward"} == {algorithm}


def test_nans_as_torch():
    """A NaN wins its window (max_pool2d's rule) and comes out NaN through ReLU, its gradient flowing back;
    evaluation mode, so the NaN does not spread through the statistics."""
    g = torch.Generator().manual_seed(3)
    x, w, b, (rm, rv) = batch_norm_case((2, 3, 6, 10), torch.float32, g)
    with torch.no_grad():
        x[0, 1, 2, 3] = x[1, 2, 5, 9] = float("nan")
    out = cnn_ext.functional.batch_norm_relu_max_pool2d(x, rm, rv, w, b, False)
    tx, tw, tb = _leaves(x, w, b)
    ref = F.max_pool2d(F.relu(F.batch_norm(tx, rm, rv, tw, tb, False)), 2)
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert out[0, 1, 1, 1].isnan() and out[1, 2, 2, 4].isnan()
    grad_out = torch.randn(out.shape, generator=g)
    got = grads(out, [x, w, b], grad_out)
    for name, a, e in zip(("input", "weight", "bias"), got, grads(ref, [tx, tw, tb], grad_out)):
        torch.testing.assert_close(a, e, equal_nan=True, msg=f"grad {name}")
    assert got[0][0, 1, 2, 3] != 0


def test_thread_count_does_not_change_results():
    g = torch.Generator().manual_seed(4)
    x, w, b, _ = batch_norm_case((6, 9, 13, 13), torch.float32, g)
    x, w, b = x.detach(), w.detach(), b.detach()
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out, mean, var, idx = ops.batch_norm_relu_max_pool2d(x, w, b, None, None, True, 1e-5, [3, 3], [2, 2],
                                                                 [1, 1], [1, 1], False)
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
            results.append((out, mean, var, idx, *ops.batch_norm_relu_max_pool2d_backward(
                grad_out, out, idx, x, w, mean, var, True, 1e-5, [True, True, True])))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, e) for a, e in zip(other, results[0]))


def test_module_helper_and_deep_mnist(monkeypatch):
    """cnn_ext.nn.batch_norm_relu_max_pool runs our BatchNorm2d and MaxPool2d fused, torch's layers as themselves;
    DeepMNIST's forward fuses its two pooled stages, with the bits (and running statistics) of its layers run one
    by one."""
    from cnn_ext.app import models

    torch.manual_seed(0)
    norm, pool = cnn_ext.nn.BatchNorm2d(4).double(), cnn_ext.nn.MaxPool2d(2)
    theirs = torch.nn.BatchNorm2d(4).double()
    theirs.load_state_dict(norm.state_dict())
    x = torch.randn(3, 4, 10, 10, dtype=torch.float64)
    for step in range(2):
        assert_close(cnn_ext.nn.batch_norm_relu_max_pool(norm, pool, x), F.max_pool2d(F.relu(theirs(x)), 2),
                     torch.float64, msg=f"step {step}")
    assert_close(norm.running_var, theirs.running_var, torch.float64)
    assert norm.num_batches_tracked == theirs.num_batches_tracked == 2
    assert torch.equal(cnn_ext.nn.batch_norm_relu_max_pool(theirs, torch.nn.MaxPool2d(2), x),
                       F.max_pool2d(F.relu(theirs(x)), 2))

    model, twin = models.DeepMNIST("ext").double(), models.DeepMNIST("ext").double()
    twin.load_state_dict(model.state_dict())
    fused_calls = []
    helper = cnn_ext.nn.batch_norm_relu_max_pool
    monkeypatch.setattr(cnn_ext.nn, "batch_norm_relu_max_pool",
                        lambda *args: fused_calls.append(args) or helper(*args))
    images = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    fused = models._batch_norm_relu_fused(model.features, images)
    assert len(fused_calls) == 2
    assert torch.equal(fused, torch.nn.Sequential(*twin.features)(images))
    for a, b in zip(model.buffers(), twin.buffers()):
        assert torch.equal(a, b)


def test_empty_batch_and_other_dtypes():
    rm, rv = torch.zeros(3) + 0.5, torch.ones(3) * 2
    out = cnn_ext.functional.batch_norm_relu_max_pool2d(torch.randn(0, 3, 4, 4), rm, rv, training=True)
    assert out.shape == (0, 3, 2, 2)
    assert torch.equal(rm, torch.zeros(3) + 0.5) and torch.equal(rv, torch.ones(3) * 2)
    x = torch.randn(4, 3, 6, 6, dtype=torch.bfloat16)
    assert torch.equal(cnn_ext.functional.batch_norm_relu_max_pool2d(x, None, None, training=True),
                       F.max_pool2d(F.relu(F.batch_norm(x, None, None, training=True)), 2))


def _opcheck_samples():
    g = torch.Generator().manual_seed(0)
    x, w, b, (rm, rv) = batch_norm_case((3, 4, 8, 7), torch.float64, g)
    pool = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    out, mean, var, idx = ops.batch_norm_relu_max_pool2d(x.detach(), w.detach(), b.detach(), rm, rv, True, 1e-5,
                                                         *pool)
    gy = torch.randn(out.shape, generator=g, dtype=torch.float64)
    return [
        (ops.batch_norm_relu_max_pool2d, (x, w, b, rm, rv, True, 1e-5, *pool)),
        (ops.batch_norm_relu_max_pool2d, (x, None, None, rm, rv, False, 1e-5, [3, 3], [2, 2], [1, 1], [1, 1], True)),
        (ops.batch_norm_relu_max_pool2d_backward, (gy, out, idx, x.detach(), w.detach(), mean, var, True, 1e-5,
                                                   [True, True, True])),
        (ops.batch_norm_relu_max_pool2d_backward, (gy, out, idx, x.detach(), None, mean, var, False, 1e-5,
                                                   [True, False, False])),
    ]


@pytest.mark.parametrize("index", range(4))
def test_opcheck(index):
    op, args = _opcheck_samples()[index]
    torch.library.opcheck(op, args)


def test_gradcheck():
    g = torch.Generator().manual_seed(6)
    x, w, b, _ = batch_norm_case((2, 3, 6, 5), torch.float64, g)
    torch.autograd.gradcheck(
        lambda x, w, b: cnn_ext.functional.batch_norm_relu_max_pool2d(x, None, None, w, b, True, 0.1, 1e-5, 3, 2, 1),
        (x, w, b))


def test_double_backward_refused():
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    out = cnn_ext.functional.batch_norm_relu_max_pool2d(x, None, None, training=True)
    with pytest.raises(RuntimeError, match="cnn_ext.batch_norm_relu_max_pool2d: double backward"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)


POOL = ([2, 2], [2, 2], [0, 0], [1, 1], False)


def _backward(x, c, grad_output=None, output=None, indices=None, mean=None, weight=None):
    out, m, v, idx = ops.batch_norm_relu_max_pool2d(x, None, None, None, None, True, 1e-5, *POOL)
    return ops.batch_norm_relu_max_pool2d_backward(
        out if grad_output is None else grad_output, out if output is None else output,
        idx if indices is None else indices, x, weight, m if mean is None else mean, v, True, 1e-5,
        [True, True, True])


ERRORS = [
    (lambda x, c: ops.batch_norm_relu_max_pool2d(x[0], None, None, None, None, True, 1e-5, *POOL), ValueError,
     "input must be a 4-D"),
    (lambda x, c: ops.batch_norm_relu_max_pool2d(x, torch.ones(c + 1), None, None, None, True, 1e-5, *POOL),
     ValueError, "weight must be"),
    (lambda x, c: ops.batch_norm_relu_max_pool2d(x, None, None, None, None, False, 1e-5, *POOL), ValueError,
     "required when training"),
    (lambda x, c: ops.batch_norm_relu_max_pool2d(x, None, None, None, None, True, 1e-5, [2, 2], [2, 2], [2, 0],
                                                 [1, 1], False), ValueError, "padding .* must be at most half"),
    (lambda x, c: ops.batch_norm_relu_max_pool2d(x, None, None, None, None, True, 1e-5, [0, 2], [2, 2], [0, 0],
                                                 [1, 1], False), ValueError, "kernel_size must be positive"),
    (lambda x, c: ops.batch_norm_relu_max_pool2d(x, None, None, None, None, True, 1e-5, [9, 9], [1, 1], [0, 0],
                                                 [1, 1], False), ValueError, "height"),
    (lambda x, c: ops.batch_norm_relu_max_pool2d(x.half(), None, None, None, None, True, 1e-5, *POOL), TypeError,
     "CPU kernels"),
    (lambda x, c: _backward(x, c, grad_output=torch.zeros(2, c + 1, 2, 2)), ValueError,
     "batch and channel sizes must match"),
    (lambda x, c: _backward(x, c, output=torch.zeros(2, c, 2, 3)), ValueError, "output has shape"),
    (lambda x, c: _backward(x, c, indices=torch.zeros(2, c, 2, 2, dtype=torch.int32)), TypeError,
     "indices must be int64"),
    (lambda x, c: _backward(x, c, indices=torch.zeros(2, c, 2, 1, dtype=torch.long)), ValueError,
     "indices has shape"),
    (lambda x, c: _backward(x, c, indices=torch.full((2, c, 2, 2), 16)), ValueError,
     r"indices\[0, 0, 0, 0\] = 16 is not a position in the input plane"),
    (lambda x, c: _backward(x, c, mean=torch.zeros(c + 1)), ValueError, "mean must be"),
    (lambda x, c: _backward(x, c, grad_output=torch.zeros(2, c, 2, 2, dtype=torch.float64)), TypeError,
     "grad_output has dtype"),
]


@pytest.mark.parametrize("index", range(len(ERRORS)))
def test_errors(index):
    call, error, message = ERRORS[index]
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(error, match=message):
        call(x, 3)
