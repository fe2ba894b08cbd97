"""Which CPU kernel serves a call: the instruction set, and the algorithm of each direction.

The CPU kernels exist per ISA (AVX-512, AVX2+FMA, portable) and, per direction, as several algorithms (implicit or
explicit im2col, dot tiles, the batch-in-lanes kernels, ...), chosen by the rules of csrc/cpu/dispatch.cpp, whose
tables `tables()` returns and `print_tables()` prints.

  * ISA: the best one this CPU and torch's own knob allow. `ATEN_CPU_CAPABILITY=default|avx2|avx512` (read by torch
    at start-up, reported by torch.backends.cpu.get_cpu_capability()) limits ours as it limits torch's, so
    `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m benchmarks.run` compares both as on an AVX2 machine.
    `cnn_ext.cpu_capability()` is the ISA our kernels use.
  * Algorithms: `CNN_EXT_CPU_ALGORITHMS=fprop=explicit,dgrad=dcol` forces them for a whole process; a forced
    algorithm serves every call it can compute (explicit im2col can serve any; dgrad's implicit and dcol only stride
    1; lanes only float32 on AVX2 and AVX-512), the usual rule the others.

Within a process, tests use:

    with cpu_dispatch.forced(isa="avx2", fprop="explicit"), cpu_dispatch.recording() as calls:
        y = cnn_ext.functional.conv2d(x, w)
    assert calls == [("fprop", "explicit", "avx2")]
"""

import contextlib
import os

from . import _C

ISAS = ("default", "avx2", "avx512")


def capability():
    """The ISA the CPU kernels use: "avx512", "avx2" or "default" (the portable code non-x86 machines get)."""
    return _C.cpu_isa()


def machine_capability():
    """The best ISA this CPU and ATEN_CPU_CAPABILITY allow (capability() may be lower inside forced(isa=...))."""
    return _C.machine_isa()


def available_isas():
    """The ISAs the kernels can run here, from the portable code up to machine_capability()."""
    return ISAS[:ISAS.index(machine_capability()) + 1]


def tables():
    """{direction: [(algorithm, when it is chosen, why), ...]} in each table's order of preference."""
    return {direction: rows for direction, rows in _C.cpu_dispatch_tables()}


def print_tables():
    for direction, rows in tables().items():
        for i, (algorithm, when, why) in enumerate(rows):
            print(f"{direction if i == 0 else '':18} {algorithm:13} {when}  ({why})")


def _set_forced(direction, algorithm):
    if direction not in tables():
        raise ValueError(f"unknown direction {direction!r}: choose from {', '.join(tables())}")
    names = [row[0] for row in tables()[direction]]
    if algorithm is not None and algorithm not in names:
        raise ValueError(f"unknown {direction} algorithm {algorithm!r}: choose from {', '.join(names)}")
    _C.set_cpu_forced(direction, algorithm)


def _set_isa(isa):
    if isa not in ISAS:
        raise ValueError(f"unknown ISA {isa!r}: choose from {', '.join(ISAS)}")
    if isa not in available_isas():
        raise ValueError(f"this machine runs the kernels up to {machine_capability()}, not {isa}")
    return _C.set_cpu_isa_limit(isa)


@contextlib.contextmanager
def forced(isa=None, **algorithms):
    """Within the block the kernels use at most `isa` and the named algorithms (direction=algorithm, e.g.
    fprop="implicit"; None clears a direction's); both are restored on exit."""
    before = dict(_C.cpu_forced())
    previous_isa, changed = None, []
    try:
        if isa is not None:
            previous_isa = _set_isa(isa)
        for direction, algorithm in algorithms.items():
            _set_forced(direction, algorithm)
            changed.append(direction)
        yield
    finally:
        if previous_isa is not None:
            _C.set_cpu_isa_limit(previous_isa)
        for direction in changed:
            _C.set_cpu_forced(direction, before.get(direction))


@contextlib.contextmanager
def recording():
    """Yields a list that receives a (direction, algorithm, isa) triple per kernel call made in the block, when it
    ends."""
    calls = []
    _C.take_cpu_record()
    _C.set_cpu_recording(True)
    try:
        yield calls
    finally:
        _C.set_cpu_recording(False)
        calls.extend(_C.take_cpu_record())


def force_from_environment():
    """CNN_EXT_CPU_ALGORITHMS=direction=algorithm,... forces those algorithms for the whole process."""
    text = os.environ.get("CNN_EXT_CPU_ALGORITHMS", "").strip()
    for item in filter(None, (part.strip() for part in text.split(","))):
        direction, sep, algorithm = item.partition("=")
        if not sep:
            raise ValueError(f"CNN_EXT_CPU_ALGORITHMS: {item!r} is not direction=algorithm")
        try:
            _set_forced(direction.strip(), algorithm.strip())
        except ValueError as e:
            raise ValueError(f"CNN_EXT_CPU_ALGORITHMS: {e}") from None
