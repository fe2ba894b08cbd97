"""Run cnn_ext's CUDA kernels on the CPU.

The kernels in csrc/cuda/ are also compiled for the CPU against an emulation of CUDA's execution model
(csrc/emulator/): grid and block indices, per-block shared memory, barriers at which a block's threads really wait
for each other, and warp operations. While the emulation is enabled, cnn_ext's operators on CPU tensors run those
CUDA kernels, with the GPU's launch configuration (tiles, split-K, index width, grid sizing: the emulated device has
an H100/H200's 132 multiprocessors), instead of the CPU kernels. Everything above the operators (autograd,
cnn_ext.functional, cnn_ext.nn, the trainer, the test suite) runs unchanged, as with Triton's TRITON_INTERPRET=1:

    from cnn_ext import cuda_emulation
    with cuda_emulation.enabled(order="reverse"):
        y = cnn_ext.functional.conv2d(x, w)        # x, w on the CPU; computed by the CUDA kernels

    CNN_EXT_CUDA_EMULATION=1 python -m pytest tests/test_conv_parity.py -k cpu      # a whole process
    CNN_EXT_CUDA_EMULATION=random python -m cnn_ext.train --device cpu --train-limit 512

`order` is the order in which a block's threads run between two barriers ("forward", "reverse", or "random" with
`seed`): a missing barrier makes some thread read shared memory before, or after, another thread writes it, so
results change with the order. float16 and bfloat16 work on CPU tensors here, as they do on a GPU.

It proves the kernels' arithmetic, indexing, launch configuration and intra-block synchronisation. It cannot show
timing, the memory model between blocks (they run in any order and see each other's writes at once), real warp
scheduling (lanes never run in lockstep here), resource limits (registers, shared-memory capacity) or the GPU's
exact floating-point instructions (fused multiply-adds).
"""

import contextlib
import os

_ORDERS = ("forward", "reverse", "random")


def _module():
    try:
        from . import _cuda_emulator
    except ImportError as e:
        raise RuntimeError(
            "cnn_ext was built without the CUDA emulator (CNN_EXT_NO_EMULATOR was set): rebuild it with "
            "`pip install --no-build-isolation -e .`"
        ) from e
    return _cuda_emulator


def available():
    """Whether this build has the emulated CUDA kernels."""
    try:
        _module()
    except RuntimeError:
        return False
    return True


def is_enabled():
    """Whether cnn_ext's operators on CPU tensors currently run the emulated CUDA kernels."""
    return available() and _module().is_enabled()


def options():
    """The emulator's settings: order, seed, multiprocessor_count, force_int64_indices, drop_barriers,
    record_launches."""
    return _module().options()


def set_options(*, order=None, seed=None, multiprocessor_count=None, force_int64_indices=None, drop_barriers=None,
                record_launches=None):
    """Change the emulator's settings; arguments left as None keep their value.

    order: "forward", "reverse" or "random" (the order of a block's threads between barriers).
    seed: the random order's seed. multiprocessor_count: the emulated device's SM count, which the launch
    configuration (split-K) reads. force_int64_indices: run the kernels' 64-bit index paths on any shape.
    drop_barriers: fault injection for testing the emulator: every __syncthreads() returns at once.
    record_launches: keep every launch's kernel, grid and block (see launches())."""
    kwargs = {k: v for k, v in dict(order=order, seed=seed, multiprocessor_count=multiprocessor_count,
                                    force_int64_indices=force_int64_indices, drop_barriers=drop_barriers,
                                    record_launches=record_launches).items() if v is not None}
    _module().set_options(**kwargs)


def enable(**settings):
    """Serve cnn_ext's operators on CPU tensors with the emulated CUDA kernels (settings as set_options)."""
    set_options(**settings)
    _module().enable()


def disable():
    """Serve them with the CPU kernels again."""
    if available():
        _module().disable()


@contextlib.contextmanager
def enabled(**settings):
    """Within the block, cnn_ext's operators on CPU tensors run the emulated CUDA kernels; settings as
    set_options, restored on exit together with the previous state."""
    was_enabled, before = is_enabled(), options()
    enable(**settings)
    try:
        yield
    finally:
        if not was_enabled:
            disable()
        _module().set_options(**before)


def enable_from_environment():
    """CNN_EXT_CUDA_EMULATION=1 (or forward, reverse, random) enables the emulation for the whole process."""
    value = os.environ.get("CNN_EXT_CUDA_EMULATION", "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return
    if value in ("1", "true", "yes", "on"):
        value = "forward"
    if value not in _ORDERS:
        raise ValueError(f"CNN_EXT_CUDA_EMULATION must be 1 or one of {', '.join(_ORDERS)}, got {value!r}")
    enable(order=value)


@contextlib.contextmanager
def launches():
    """Records the kernel launches made in the block: yields a list that receives a (kernel, grid, block) tuple per
    launch when the block ends, the kernel named with its template arguments, e.g.
    ("direct_fprop_kernel<float, int>", (12, 1, 1), (256, 1, 1))."""
    module = _module()
    record, recorded = options()["record_launches"], []
    module.take_launch_record()
    module.set_options(record_launches=True)
    try:
        yield recorded
    finally:
        recorded.extend(module.take_launch_record())
        module.set_options(record_launches=record)
