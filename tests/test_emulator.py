"""The CUDA emulator (csrc/emulator/, cnn_ext.cuda_emulation) itself, and what it shows about the CUDA kernels.

The device-parametrised suites already run every CUDA kernel through it (their "emulated" cases); here:
  * every kernel and launch path runs, in every dtype and both index widths, as the launch record proves;
  * correct kernels give the same bits in every thread order, and the emulator catches a missing barrier in the
    real kernels (fault injection: drop_barriers) in each order;
  * the emulator's own semantics: barriers, warp operations as CUDA documents them, and the misuse it must refuse.
"""

import contextlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import cnn_ext
from _support import DEVICES, is_emulated
from cnn_ext import cuda_emulation

pytestmark = pytest.mark.skipif(not cuda_emulation.available(), reason="cnn_ext was built without the CUDA emulator")

ops = torch.ops.cnn_ext
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Loose: this file checks that paths run and agree with torch; test_low_precision.py bounds float16/bfloat16 tightly.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def _selftest():
    cuda_emulation.available()  # loads the module, which defines the test operators
    return torch.ops.cnn_ext_emulator_test


def _close(got, want, dtype, what):
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.double().cpu(), want, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * scale,
                               msg=what)


def _t(shape, dtype, g, requires_grad=True):
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)


def _check_conv(x, w, b, dtype, **args):
    out = cnn_ext.functional.conv2d(x, w, b, **args)
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    got = [out] + list(torch.autograd.grad(out, [x, w, b], grad_out))
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = F.conv2d(x64, w64, b64, **args)
    want = [ref.detach()] + list(torch.autograd.grad(ref, [x64, w64, b64], grad_out.double()))
    for name, a, e in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, want):
        _close(a, e, dtype, f"conv2d {name} {dtype}")


def _check_pools(x, dtype):
    out, idx = cnn_ext.functional.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
    x64 = x.detach().double().requires_grad_()
    ref, ref_idx = F.max_pool2d(x64, 3, 2, 1, ceil_mode=True, return_indices=True)
    assert torch.equal(idx, ref_idx)
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    _close(torch.autograd.grad(out, x, grad_out)[0], torch.autograd.grad(ref, x64, grad_out.double())[0], dtype,
           "max_pool2d grad")
    avg = cnn_ext.functional.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
    ref = F.avg_pool2d(x64, 3, 2, 1, count_include_pad=False)
    _close(avg, ref.detach(), dtype, "avg_pool2d")
    grad_out = torch.randn(avg.shape, dtype=torch.float64).to(dtype)
    _close(torch.autograd.grad(avg, x, grad_out)[0], torch.autograd.grad(ref, x64, grad_out.double())[0], dtype,
           "avg_pool2d grad")


def _check_fused(x, w, b, dtype):
    out = cnn_ext.functional.conv2d_maxpool_relu(x, w, b, padding=1, pool_kernel_size=2)
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    got = [out] + list(torch.autograd.grad(out, [x, w, b], grad_out))
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = torch.relu(F.max_pool2d(F.conv2d(x64, w64, b64, padding=1), 2))
    want = [ref.detach()] + list(torch.autograd.grad(ref, [x64, w64, b64], grad_out.double()))
    for name, a, e in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, want):
        _close(a, e, dtype, f"fused {name} {dtype}")


def _run_every_path(dtype, g):
    """Calls that between them take every kernel and launch path, each checked against torch."""
    _check_conv(_t((2, 4, 9, 9), dtype, g), _t((6, 4, 3, 3), dtype, g), _t((6,), dtype, g), dtype, padding=1)
    # fprop and dgrad with a GEMM K of 288 and a single output tile: split-K.
    _check_conv(_t((1, 32, 8, 8), dtype, g), _t((32, 32, 3, 3), dtype, g), _t((32,), dtype, g), dtype, padding=1)
    # wgrad with a GEMM K of N·P·Q = 576: split-K.
    _check_conv(_t((4, 4, 12, 12), dtype, g), _t((8, 4, 3, 3), dtype, g), _t((8,), dtype, g), dtype, padding=1)
    # One input channel per group: the direct kernels (depthwise, channel multiplier 2).
    _check_conv(_t((2, 4, 7, 7), dtype, g), _t((8, 1, 3, 3), dtype, g), _t((8,), dtype, g), dtype, padding=1,
                groups=4)
    _check_pools(_t((2, 3, 9, 10), dtype, g), dtype)
    # The fused op with its channel's weights staged in shared memory, then with too many (C·R·S = 4140 > 4096)
    # read from global memory.
    _check_fused(_t((2, 4, 8, 8), dtype, g), _t((6, 4, 3, 3), dtype, g), _t((6,), dtype, g), dtype)
    _check_fused(_t((1, 460, 4, 4), dtype, g), _t((3, 460, 3, 3), dtype, g), _t((3,), dtype, g), dtype)


KERNELS = ["implicit_gemm_kernel<GemmTile<64, 64, 16, 4, 4>, FpropProblem<{t}, {i}> >",
           "implicit_gemm_kernel<GemmTile<64, 64, 16, 4, 4>, DgradProblem<{t}, {i}> >",
           "implicit_gemm_kernel<GemmTile<64, 64, 16, 4, 4>, WgradProblem<{t}, {i}> >",
           "split_k_reduce_kernel<FpropProblem<{t}, {i}> >",
           "split_k_reduce_kernel<DgradProblem<{t}, {i}> >",
           "split_k_reduce_kernel<WgradProblem<{t}, {i}> >",
           "direct_fprop_kernel<{t}, {i}>", "direct_dgrad_kernel<{t}, {i}>", "direct_wgrad_kernel<{t}, {i}>",
           "bias_grad_kernel<{t}, {i}>", "max_pool2d_kernel<{t}, {i}>", "max_pool2d_backward_kernel<{t}, {i}>",
           "avg_pool2d_kernel<{t}, {i}>", "avg_pool2d_backward_kernel<{t}, {i}>",
           "conv2d_maxpool_relu_kernel<{t}, {i}>"]
TYPE_NAMES = {torch.float32: "float", torch.float64: "double", torch.float16: "c10::Half",
              torch.bfloat16: "c10::BFloat16"}


@pytest.mark.parametrize("int64_indices", [False, True], ids=["int32_index", "int64_index"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64", "f16", "bf16"])
def test_every_kernel_and_launch_path_runs(dtype, int64_indices):
    """Forward and every gradient through each kernel, against torch; the launch record shows each kernel (with
    and without split-K) ran in this dtype and index width."""
    g = torch.Generator().manual_seed(0)
    with cuda_emulation.enabled(force_int64_indices=int64_indices), cuda_emulation.launches() as launched:
        _run_every_path(dtype, g)
    names = [name for name, _, _ in launched]
    index = "long int" if int64_indices else "int"
    expected = {k.format(t=TYPE_NAMES[dtype], i=index) for k in KERNELS}
    assert not expected - set(names), f"kernels that did not run: {sorted(expected - set(names))}"
    # Each GEMM direction also ran without split-K: a GEMM launch not followed by its split-K reduction.
    for problem in ("FpropProblem", "DgradProblem", "WgradProblem"):
        unsplit = [i for i, name in enumerate(names) if name.startswith("implicit_gemm") and problem in name
                   and not (i + 1 < len(names) and names[i + 1].startswith("split_k_reduce"))]
        assert unsplit, f"{problem} always split K"


def test_launch_configuration_is_the_gpus():
    """The emulated device has an H100/H200's 132 multiprocessors, which the launch configuration reads as on a
    GPU: a GEMM of 5 output tiles and K = 288 splits K in two to fill 132 of them, not to fill 2."""
    x, w = torch.randn(5, 32, 8, 8), torch.randn(64, 32, 3, 3)
    splits = {}
    for sms in (132, 2):
        with cuda_emulation.enabled(multiprocessor_count=sms), cuda_emulation.launches() as launched:
            cnn_ext.functional.conv2d(x, w, padding=1)
        gemm_name, grid, block = launched[0]
        assert gemm_name.startswith("implicit_gemm_kernel") and grid[:2] == (5, 1) and block == (256, 1, 1)
        splits[sms] = grid[2]
    assert cuda_emulation.options()["multiprocessor_count"] == 132
    assert splits == {132: 2, 2: 1}


@pytest.mark.parametrize("device", DEVICES)
def test_emulated_device_runs_the_cuda_kernels(device):
    """The suites' "emulated" device runs the CUDA kernels (the launch record fills); "cpu" runs the CPU ones."""
    if device == "cuda":
        pytest.skip("the emulator serves CPU tensors only")
    with cuda_emulation.launches() as launched:
        cnn_ext.functional.conv2d(torch.randn(1, 2, 5, 5, device=device), torch.randn(3, 2, 3, 3, device=device))
    assert cuda_emulation.is_enabled() == is_emulated(device) == bool(launched)


@pytest.mark.parametrize("order", ["reverse", "random"])
def test_results_do_not_depend_on_thread_order(order):
    """Correct kernels give the same bits whichever order a block's threads run in between barriers."""
    g = torch.Generator().manual_seed(1)
    inputs = [_t(s, torch.float32, g, requires_grad=False) for s in ((3, 8, 11, 9), (12, 8, 3, 3), (12,))]

    def run():
        out = ops.conv2d(*inputs, [1, 1], [1, 1], [1, 1], 1)
        fused = ops.conv2d_maxpool_relu(*inputs, [1, 1], [1, 1], [1, 1], 1, [2, 2], [2, 2], [0, 0], [1, 1], False)
        return [out, ops.conv2d_backward_input(out, inputs[1], list(inputs[0].shape), [1, 1], [1, 1], [1, 1], 1),
                ops.conv2d_backward_weight(out, inputs[0], list(inputs[1].shape), [1, 1], [1, 1], [1, 1], 1),
                ops.conv2d_backward_bias(out), *fused]

    with cuda_emulation.enabled(order="forward"):
        forward = run()
    for seed in (0, 1):
        with cuda_emulation.enabled(order=order, seed=seed):
            for a, b in zip(run(), forward):
                assert torch.equal(a, b)


# Each case runs kernels whose threads exchange data through shared memory behind a barrier.
RACE_CASES = {
    "gemm_fprop": lambda g: ops.conv2d(_t((2, 8, 9, 9), torch.float64, g, False), _t((12, 8, 3, 3), torch.float64, g,
                                                                                    False), None, [1, 1], [1, 1],
                                       [1, 1], 1),
    "gemm_dgrad": lambda g: ops.conv2d_backward_input(_t((2, 12, 9, 9), torch.float64, g, False),  # C > 16: GEMM
                                                      _t((12, 20, 3, 3), torch.float64, g, False), [2, 20, 9, 9],
                                                      [1, 1], [1, 1], [1, 1], 1),
    "gemm_wgrad_split_k": lambda g: ops.conv2d_backward_weight(_t((4, 8, 12, 12), torch.float64, g, False),
                                                               _t((4, 4, 12, 12), torch.float64, g, False),
                                                               [8, 4, 3, 3], [1, 1], [1, 1], [1, 1], 1),
    "direct_wgrad_block_sum": lambda g: ops.conv2d_backward_weight(_t((2, 8, 7, 7), torch.float64, g, False),
                                                                   _t((2, 4, 7, 7), torch.float64, g, False),
                                                                   [8, 1, 3, 3], [1, 1], [1, 1], [1, 1], 4),
    "bias_grad_block_sum": lambda g: ops.conv2d_backward_bias(_t((3, 5, 9, 9), torch.float64, g, False)),
    "fused_shared_weights": lambda g: ops.conv2d_maxpool_relu(
        _t((2, 4, 8, 8), torch.float64, g, False), _t((6, 4, 3, 3), torch.float64, g, False), None, [1, 1], [1, 1],
        [1, 1], 1, [2, 2], [2, 2], [0, 0], [1, 1], False)[0],
}


@pytest.mark.parametrize("case", list(RACE_CASES))
def test_missing_barrier_is_caught(case):
    """With its barriers removed (fault injection), each kernel that shares data through shared memory gives wrong
    results on the emulator in some thread order (not necessarily every one: in reverse order a tree reduction's
    threads find what they read already written), and with its barriers the right ones in every order. Each run
    gets fresh data: shared memory keeps what the previous block on that CPU thread left there."""
    caught = []
    for seed, order in enumerate(["forward", "reverse", "random"]):
        with cuda_emulation.enabled(order=order, seed=seed):
            RACE_CASES[case](torch.Generator().manual_seed(7))
            with cuda_emulation.enabled(drop_barriers=True):
                wrong = RACE_CASES[case](torch.Generator().manual_seed(8))
            right = RACE_CASES[case](torch.Generator().manual_seed(8))
        assert torch.allclose(right, RACE_CASES[case](torch.Generator().manual_seed(8)))  # the CPU kernels agree
        if not torch.allclose(wrong, right):
            caught.append(order)
    assert "forward" in caught, f"a kernel without its barriers gave the right result (caught in: {caught})"


def test_bad_max_pool_indices_raise_through_the_fused_backward():
    """The CUDA max-pool backward checks every index and reports the first bad one as the CPU kernels do; the fused
    op's backward on CUDA (a composite) reaches it too."""
    x, w = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64)
    conv, pool = ([1, 1], [1, 1], [1, 1], 1), ([2, 2], [2, 2], [0, 0], [1, 1], False)
    with cuda_emulation.enabled():
        out, idx = ops.conv2d_maxpool_relu(x, w, None, *conv, *pool)
        bad = idx.clone()
        bad[1, 2, 3, 0] = -7
        with pytest.raises(ValueError, match=r"max_pool2d_backward: indices\[1, 2, 3, 0\] = -7 is not a position"):
            ops.conv2d_maxpool_relu_backward(torch.ones_like(out), out, bad, x, w, *conv, *pool, [True, True, True])


def test_environment_variable_enables_it_for_a_process():
    code = ("import cnn_ext; from cnn_ext import cuda_emulation as e; "
            "print(e.is_enabled(), e.options()['order'])")
    env = dict(os.environ, CNN_EXT_CUDA_EMULATION="reverse")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["True", "reverse"], result.stderr
    env["CNN_EXT_CUDA_EMULATION"] = "sideways"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "CNN_EXT_CUDA_EMULATION must be 1 or one of" in result.stderr


def test_enabled_restores_the_previous_state():
    before = cuda_emulation.options()
    with cuda_emulation.enabled(order="random", seed=5, force_int64_indices=True):
        assert cuda_emulation.is_enabled()
        with cuda_emulation.enabled(order="reverse"):
            assert cuda_emulation.options()["order"] == "reverse"
        assert cuda_emulation.is_enabled() and cuda_emulation.options()["order"] == "random"
    assert not cuda_emulation.is_enabled() and cuda_emulation.options() == before
    with pytest.raises(TypeError, match="Half, which the CPU kernels"):  # the CPU kernels serve again
        cnn_ext.functional.conv2d(torch.randn(1, 1, 4, 4).half(), torch.randn(1, 1, 3, 3).half())
    with pytest.raises(ValueError, match="order must be"):
        cuda_emulation.set_options(order="sideways")


# ---------------------------------------------------------------------------------------------------------------
# The emulator's own semantics, on small kernels (csrc/emulator/selftest.cpp).
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["forward", "reverse", "random"])
def test_barrier_orders_shared_memory(order):
    t = _selftest()
    cuda_emulation.set_options(order=order)
    try:
        x = torch.randn(4 * 256)
        assert torch.equal(t.block_reverse(x), x.view(4, 256).flip(1).reshape(-1))
        cuda_emulation.set_options(drop_barriers=True)
        x = torch.randn(4 * 256)
        wrong = t.block_reverse(x) != x.view(4, 256).flip(1).reshape(-1)
        assert wrong.sum() >= 4 * 128  # at least half of each block reads before its partner wrote
    finally:
        cuda_emulation.set_options(order="forward", drop_barriers=False)


def test_wrong_index_is_caught():
    t = _selftest()
    x = torch.randn(37, 21)
    assert torch.equal(t.tiled_transpose(x, False), x.t())
    assert not torch.equal(t.tiled_transpose(x, True), x.t())


def test_barrier_reductions():
    flags = torch.tensor([1, 0, 1] * 20, dtype=torch.int32)
    assert _selftest().barrier_reductions(flags).tolist() == [40, 0, 1]
    assert _selftest().barrier_reductions(torch.ones(33, dtype=torch.int32)).tolist() == [33, 1, 1]


def _expected_warp_op(op, values, arg, mask, width):
    """CUDA's documented results, per thread (-1 where the lane is not in the mask)."""
    out = []
    for thread, v in enumerate(values):
        lane, base = thread % 32, thread // 32 * 32
        if not mask >> lane & 1:
            out.append(-1)
            continue
        segment = lane // width * width
        members = [base + m for m in range(32) if mask >> m & 1 and base + m < len(values)]
        source = {"shfl": segment + arg % width,
                  "shfl_up": lane - arg if lane - segment >= arg else lane,
                  "shfl_down": lane + arg if lane - segment + arg < width else lane,
                  "shfl_xor": lane ^ arg if (lane ^ arg) < segment + width else lane}.get(op)
        if source is not None:
            out.append(values[base + source])
        elif op == "ballot":
            out.append(sum(1 << (m - base) for m in members if values[m]))
        elif op == "any":
            out.append(int(any(values[m] for m in members)))
        elif op == "all":
            out.append(int(all(values[m] for m in members)))
        else:  # syncwarp
            out.append(v)
    # ballot over all 32 lanes sets bit 31: as a signed 32-bit result
    return [o - (1 << 32) if o >= 1 << 31 else o for o in out]


WARP_CASES = [("shfl", 5, 0xFFFFFFFF, 32), ("shfl", 5, 0xFFFFFFFF, 8), ("shfl", 35, 0xFFFFFFFF, 32),
              ("shfl_up", 3, 0xFFFFFFFF, 32), ("shfl_up", 3, 0xFFFFFFFF, 8),
              ("shfl_down", 3, 0xFFFFFFFF, 32), ("shfl_down", 3, 0x0000FFFF, 8),
              ("shfl_xor", 1, 0xFFFFFFFF, 32), ("shfl_xor", 16, 0xFFFFFFFF, 16), ("shfl_xor", 4, 0xFF00FF00, 8),
              ("ballot", 0, 0xFFFFFFFF, 32), ("ballot", 0, 0x0F0F0F0F, 32), ("any", 0, 0xFFFFFFFF, 32),
              ("all", 0, 0xFFFFFFFF, 32), ("all", 0, 0x0000AAAA, 32), ("syncwarp", 0, 0x00FF00FF, 32)]


@pytest.mark.parametrize("threads", [64, 48], ids=["two_warps", "partial_warp"])
@pytest.mark.parametrize("op, arg, mask, width", WARP_CASES)
def test_warp_operations_follow_cuda(op, arg, mask, width, threads):
    if threads == 48:  # the second warp has 16 lanes: a mask may only name those, a shuffle only reach them
        mask, width = mask & 0xFFFF, min(width, 16)
    g = torch.Generator().manual_seed(arg)
    if op in ("ballot", "any", "all"):
        values = torch.randint(0, 2, (threads,), generator=g, dtype=torch.int32)
        if op == "all":
            values[:8] = 1
    else:
        values = torch.randint(0, 1000, (threads,), generator=g, dtype=torch.int32)
    got = _selftest().warp_op(values, op, arg, mask, width).tolist()
    assert got == _expected_warp_op(op, values.tolist(), arg, mask, width)


@pytest.mark.parametrize("kind, message", [
    ("divergent_barrier", r"__syncthreads\(\) in block \(0, 0, 0\) was reached by 32 of its 64 threads while 32 "
                          r"had returned"),
    ("warp_deadlock", r"__shfl_sync with mask 0xffffffff in block \(0, 0, 0\), warp 0: lanes 16 17 .* never arrived"),
    ("mask_omits_caller", r"the calling lane 1 is not in the mask 0x1"),
    ("mismatched_ops", r"met __ballot_sync with mask 0xffffffff in the same warp"),
    ("shuffle_from_inactive_lane", r"lane 0 reads lane 20, which is not in the mask 0xffff"),
    ("too_many_threads", r"asks for a block of 1025x1x1 threads"),
])
def test_misuse_is_reported(kind, message):
    """What is undefined behaviour on a GPU is an error here, naming the kernel, the block and the thread."""
    with pytest.raises(RuntimeError, match=r"CUDA emulator: .*misuse_kernel.*" + message):
        _selftest().misuse(kind)
    # The emulator is still usable afterwards.
    x = torch.randn(256)
    assert torch.equal(_selftest().block_reverse(x), x.flip(0))


def test_mnist_training_steps_match_the_cpu_kernels():
    """The seed model (fused conv + max-pool + ReLU forward, its composite backward on CUDA) trained for a few SGD
    steps through the emulated CUDA kernels follows the CPU kernels' training."""
    from cnn_ext.app.models import MNISTClassifier

    torch.manual_seed(0)
    # float64: five SGD steps amplify float32's rounding differences between two summation orders past any tight
    # tolerance (seen at 2.4e-5 on one weight, on one machine and not another).
    models = [MNISTClassifier().double(), None]
    models[1] = type(models[0])().double()
    models[1].load_state_dict(models[0].state_dict())
    images, labels = torch.randn(5, 32, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (5, 32))
    losses = []
    for model, emulated in zip(models, (False, True)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
        with cuda_emulation.enabled() if emulated else contextlib.nullcontext():
            run = []
            for x, y in zip(images, labels):
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                run.append(loss.item())
        losses.append(run)
    assert losses[0] == pytest.approx(losses[1], rel=1e-9)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)
