"""Dropout (cnn_ext.functional.dropout, cnn_ext.nn.Dropout, the ops dropout and dropout_backward): the output and
gradient are torch's formulas applied with our mask, bit for bit, on every ISA; the mask's statistics (the kept
fraction, no correlation between neighbours or between calls); repeatability under torch.manual_seed and
independence of the thread count, ISA and dtype; torch's rules for eval, p = 0 and p = 1, infinities and NaN; the
fallbacks to torch; opcheck; argument errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import cnn_ext
from cnn_ext import cpu_dispatch

ops = torch.ops.cnn_ext
ISAS = cpu_dispatch.available_isas()


def _reference(x, kept, p):
    """torch's dropout (native_dropout's CPU formula) with the given mask."""
    scale = 0.0 if p == 1 else 1.0 / (1.0 - p)
    return x * kept * scale


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("isa", ISAS)
def test_output_and_gradient_are_torch_formulas_with_our_mask(isa, dtype):
    g = torch.Generator().manual_seed(0)
    for shape, p in [((128, 3200), 0.3), ((3, 5, 7), 0.5), ((1,), 0.1), ((2049,), 0.9), ((4, 0, 3), 0.5)]:
        x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        grad_out = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        with cpu_dispatch.forced(isa=isa):
            out, kept = ops.dropout(x, p, 1234)
            (grad,) = torch.autograd.grad(out, x, grad_out)
        assert kept.dtype == torch.bool and kept.shape == x.shape
        assert torch.equal(out, _reference(x.detach(), kept, p)), (shape, p)
        assert torch.equal(grad, _reference(grad_out, kept, p)), (shape, p)
        assert torch.equal(grad, torch.ops.aten.native_dropout_backward(grad_out, kept, 1.0 / (1.0 - p)))


def test_mask_depends_on_seed_and_position_only():
    """Same seed: the same mask whatever the ISA, dtype, thread count or leading shape; another seed: another."""
    x = torch.randn(5000, dtype=torch.float64)
    want = ops.dropout(x, 0.4, 77)[1]
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for isa in ISAS:
                with cpu_dispatch.forced(isa=isa):
                    for t in (x, x.float(), x.view(50, 100), x.float().view(10, 5, 100)):
                        assert torch.equal(ops.dropout(t, 0.4, 77)[1].flatten(), want)
    finally:
        torch.set_num_threads(previous)
    # A non-contiguous input is masked in its contiguous order.
    y = x.view(100, 50).t()
    assert torch.equal(ops.dropout(y, 0.4, 77)[1], ops.dropout(y.contiguous(), 0.4, 77)[1])
    assert not torch.equal(ops.dropout(x, 0.4, 78)[1], want)


@pytest.mark.parametrize("p", [0.001, 0.1, 0.3, 0.5, 0.9, 0.999])
def test_kept_fraction_and_independence(p):
    """Over a million values: the kept fraction is 1 - p within 5 standard deviations; neighbours (the two halves
    of one 64-bit draw, and consecutive draws) and two calls' masks are uncorrelated to within 5 standard errors."""
    n = 1 << 20
    kept = ops.dropout(torch.ones(n), p, 2024)[1].double()
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(kept.mean().item() - (1 - p)) < 5 * sd

    def correlation(a, b):
        a, b = a - a.mean(), b - b.mean()
        return ((a * b).mean() / (a.std() * b.std())).item()

    bound = 5 / math.sqrt(n / 2)
    assert abs(correlation(kept[0::2], kept[1::2])) < bound  # the halves of one draw
    assert abs(correlation(kept[1:-1:2], kept[2::2])) < bound  # the last value of a draw and the next draw's first
    other = ops.dropout(torch.ones(n), p, 2025)[1].double()
    assert abs(correlation(kept, other)) < 5 / math.sqrt(n)


def test_functional_follows_torch_manual_seed_and_generator():
    x = torch.randn(64, 100)
    torch.manual_seed(5)
    a = cnn_ext.functional.dropout(x, 0.5)
    b = cnn_ext.functional.dropout(x, 0.5)
    torch.manual_seed(5)
    assert torch.equal(cnn_ext.functional.dropout(x, 0.5), a)
    assert not torch.equal(a, b)  # each call draws a new seed
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(cnn_ext.functional.dropout(x, 0.5, generator=g1),
                       cnn_ext.functional.dropout(x, 0.5, generator=g2))


def test_torch_rules_for_eval_p0_p1_and_special_values():
    x = torch.tensor([float("inf"), -2.0, float("nan"), 3.0] * 256, requires_grad=True)
    assert cnn_ext.functional.dropout(x, 0.5, training=False) is x
    assert cnn_ext.functional.dropout(x, 0.0) is x  # as torch's
    torch.testing.assert_close(ops.dropout(x, 0.0, 1)[0], x, equal_nan=True, rtol=0, atol=0)
    # p = 1: torch's x * 0 (-0 for negatives, NaN for inf and NaN).
    torch.testing.assert_close(cnn_ext.functional.dropout(x, 1.0), F.dropout(x, 1.0), equal_nan=True, rtol=0, atol=0)
    assert torch.equal(cnn_ext.functional.dropout(x, 1.0)[1::4].signbit(), torch.ones(256, dtype=torch.bool))
    out, kept = ops.dropout(x, 0.5, 3)
    assert kept.any() and not kept.all()
    # Kept infinities stay, dropped ones are NaN (inf * 0), as in torch.
    assert out[0::4][kept[0::4]].isinf().all() and out[0::4][~kept[0::4]].isnan().all()
    assert out[2::4].isnan().all()


def test_module_and_fallbacks():
    m = cnn_ext.nn.Dropout(0.25)
    assert isinstance(m, torch.nn.Dropout) and m.p == 0.25
    x = torch.randn(32, 50)
    torch.manual_seed(0)
    out = m(x)
    assert ((out == 0) | torch.isclose(out, x / 0.75)).all() and (out == 0).any()
    assert m.eval()(x) is x
    # float16, inplace and other devices run torch's dropout.
    half = torch.randn(100).half()
    assert cnn_ext.functional.dropout(half, 0.5).dtype == torch.float16
    y = torch.randn(1000)
    cnn_ext.functional.dropout(y, 0.5, inplace=True)
    assert (y == 0).any()


def test_argument_errors():
    x = torch.randn(10)
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="dropout probability p must be between 0 and 1"):
            cnn_ext.functional.dropout(x, p)
        with pytest.raises(ValueError, match="cnn_ext.dropout: dropout probability p must be between 0 and 1"):
            ops.dropout(x, p, 0)
    with pytest.raises(TypeError, match="dropout: p must be a number"):
        cnn_ext.functional.dropout(x, "0.5")
    with pytest.raises(TypeError, match="dropout: input must be a torch.Tensor"):
        cnn_ext.functional.dropout([1.0, 2.0])
    with pytest.raises(TypeError, match="cnn_ext.dropout: input must be a floating-point tensor"):
        ops.dropout(torch.ones(3, dtype=torch.int64), 0.5, 0)
    kept = torch.ones(10, dtype=torch.bool)
    with pytest.raises(TypeError, match="cnn_ext.dropout_backward: kept must be a bool tensor"):
        ops.dropout_backward(x, kept.float(), 0.5)
    with pytest.raises(ValueError, match=r"cnn_ext.dropout_backward: kept has shape \[9\] but grad_output"):
        ops.dropout_backward(x, kept[:9], 0.5)
    with pytest.raises(TypeError, match="cnn_ext.dropout_backward: grad_output must be a floating-point tensor"):
        ops.dropout_backward(kept.long(), kept, 0.5)
    with pytest.raises(RuntimeError, match="cnn_ext.dropout: double backward is not supported"):
        x = torch.randn(10, dtype=torch.float64, requires_grad=True)
        out = cnn_ext.functional.dropout(x, 0.5)
        (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        g.sum().backward()


@pytest.mark.parametrize("sample", ["forward", "backward"])
def test_opcheck(sample):
    x = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    if sample == "forward":
        torch.library.opcheck(ops.dropout.default, (x, 0.3, 11))
    else:
        kept = ops.dropout(x, 0.3, 11)[1]
        torch.library.opcheck(ops.dropout_backward.default, (torch.randn(4, 6, 5, dtype=torch.float64), kept, 0.3))
