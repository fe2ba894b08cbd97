"""The CPU output cache (csrc/cpu/output_cache.h): our ops' outputs of 1 MiB and more reuse the blocks of freed
outputs of the same size, within a budget of free bytes (the oldest freed first); the tensors stay ordinary
(resizable, correct values); small outputs and a zero budget bypass it; the environment variable and bad budgets."""

import os
import subprocess
import sys

import pytest
import torch

import cnn_ext

ops = torch.ops.cnn_ext
MIB = 2**20


@pytest.fixture
def budget():
    """Runs the test from an empty cache, restoring the budget afterwards."""
    before = cnn_ext.output_cache_info()[1]
    cnn_ext.empty_output_cache()
    yield before
    cnn_ext.set_output_cache_budget(before)


def _conv(x, w):
    return ops.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1)


def test_freed_outputs_are_reused_with_correct_values(budget):
    x, w = torch.randn(8, 16, 48, 48, dtype=torch.float64), torch.randn(16, 16, 3, 3, dtype=torch.float64)
    expected = torch.nn.functional.conv2d(x, w, padding=1)
    out = _conv(x, w)
    first = out.data_ptr()
    assert cnn_ext.output_cache_info()[0] == 0
    del out
    held = cnn_ext.output_cache_info()[0]
    assert held == 8 * 16 * 48 * 48 * 8  # a whole number of pages
    again = _conv(x, w)
    assert again.data_ptr() == first and cnn_ext.output_cache_info()[0] == 0
    torch.testing.assert_close(again, expected)
    # Every op family: batch norm (output and mask), pooling (output and indices), the backward ops.
    y, mean, var, kept = ops.batch_norm_relu(again, None, None, None, None, True, 1e-5)
    pooled, indices = ops.max_pool2d(y, [2, 2], [2, 2], [0, 0], [1, 1], False)
    grad = ops.max_pool2d_backward(pooled, indices, list(y.shape), [2, 2], [2, 2], [0, 0], [1, 1], False)
    torch.testing.assert_close(y, torch.relu(torch.nn.functional.batch_norm(again, None, None, training=True)))
    torch.testing.assert_close(grad, torch.ops.aten.max_pool2d_with_indices_backward(
        pooled, y, [2, 2], [2, 2], [0, 0], [1, 1], False, indices))


def test_sizes_must_match_and_small_outputs_bypass(budget):
    big = _conv(torch.randn(8, 16, 48, 48), torch.randn(16, 16, 3, 3))
    del big
    held = cnn_ext.output_cache_info()[0]
    other = _conv(torch.randn(8, 16, 50, 50), torch.randn(16, 16, 3, 3))  # another size: a block of its own
    assert cnn_ext.output_cache_info()[0] == held
    small = _conv(torch.randn(1, 4, 8, 8), torch.randn(4, 4, 3, 3))
    del other, small
    assert cnn_ext.output_cache_info()[0] == held + -(-8 * 16 * 50 * 50 * 4 // 4096) * 4096  # whole pages


def test_budget_bounds_what_is_kept_oldest_first(budget):
    cnn_ext.set_output_cache_budget(3 * MIB)
    w = torch.randn(16, 16, 3, 3)
    outs = [_conv(torch.randn(8, 16, 48 + i, 48), w) for i in range(4)]  # four sizes of ~1.2-1.3 MB
    ptrs = [o.data_ptr() for o in outs]
    for i in range(4):
        outs[i] = None  # freed in this order
    held, limit = cnn_ext.output_cache_info()
    assert limit == 3 * MIB and 2 * MIB < held <= 3 * MIB  # two blocks fit
    # The newest two are kept: the last size gets its old block back.
    assert _conv(torch.randn(8, 16, 51, 48), w).data_ptr() == ptrs[3]
    cnn_ext.set_output_cache_budget(0)
    assert cnn_ext.output_cache_info()[0] == 0
    out = _conv(torch.randn(8, 16, 48, 48), w)
    del out
    assert cnn_ext.output_cache_info()[0] == 0


def test_outputs_are_ordinary_tensors(budget):
    out = _conv(torch.randn(8, 16, 48, 48), torch.randn(16, 16, 3, 3))
    head = out.flatten()[:100].clone()
    out.resize_(2 * out.numel())  # reallocates through the cache, keeping the values
    assert torch.equal(out[:100], head)
    out.resize_(10)
    assert torch.equal(out, head[:10])
    shared = out.share_memory_()  # moves the storage into shared memory (and its block back to the cache)
    assert shared.is_shared() and torch.equal(shared, head[:10])


def test_empty_output_cache_keeps_budget(budget):
    out = _conv(torch.randn(8, 16, 48, 48), torch.randn(16, 16, 3, 3))
    del out
    assert cnn_ext.output_cache_info()[0] > 0
    cnn_ext.empty_output_cache()
    assert cnn_ext.output_cache_info() == (0, budget)


@pytest.mark.parametrize("value", [-1, 1.5, True, "8"])
def test_bad_budgets(value):
    with pytest.raises(ValueError, match="budget must be a number of bytes"):
        cnn_ext.set_output_cache_budget(value)


def _import_with(value):
    env = dict(os.environ, CNN_EXT_OUTPUT_CACHE_MB=value)
    return subprocess.run([sys.executable, "-c", "import cnn_ext; print(cnn_ext.output_cache_info()[1])"],
                          env=env, capture_output=True, text=True)


def test_environment_variable():
    assert _import_with("16").stdout.strip() == str(16 * MIB)
    assert _import_with("0").stdout.strip() == "0"
    bad = _import_with("lots")
    assert bad.returncode != 0 and "CNN_EXT_OUTPUT_CACHE_MB must be a whole number of MiB" in bad.stderr
