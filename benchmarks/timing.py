"""Interleaved timing: every repetition times each function once, in turn, so machine noise (other processes,
frequency changes) lands on ours and torch's alike. Each returns {name: [seconds per call, one per repetition]}."""

import math
import time

import torch
from torch.utils.benchmark import Timer

# On the GPU, a spin kernel queued before each timed call keeps the GPU busy while Python enqueues the op, so the
# CUDA events bracket the kernels themselves rather than the host's dispatch time (the train step, timed by wall
# clock, is where host overhead counts). ~100 µs at H200 clocks.
GPU_SPIN_CYCLES = 200_000


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _seconds_per_call(fn, device):
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


ONE_THREAD = "@1"  # suffix of the contenders wallclock_samples also times on one thread


def wallclock_samples(fns, device, reps, block_s, warmup, one_thread=()):
    """Wall-clock time per call by torch.utils.benchmark.Timer (which synchronises the GPU).
    Each repetition of a function is a block of calls lasting about block_s, so short ops are not timer noise.
    The functions named in one_thread are also timed on a single CPU thread, in the same interleaved repetitions,
    as name + ONE_THREAD: how much faster the threads made them while these rows were timed."""
    contenders = [(name, fn, torch.get_num_threads()) for name, fn in fns.items()]
    contenders += [(name + ONE_THREAD, fns[name], 1) for name in one_thread if name in fns]
    calls = {}
    for name, fn, _ in contenders:
        # The fastest warm-up call sizes the block: one call slowed by the machine would make it too short.
        fastest = min(_seconds_per_call(fn, device) for _ in range(max(warmup, 1)))
        calls[name] = max(1, min(10_000, math.ceil(block_s / fastest)))
    # Timer defaults to one thread; time with the threads torch (and our OpenMP kernels) would otherwise use.
    timers = {name: Timer("fn()", globals={"fn": fn}, num_threads=threads) for name, fn, threads in contenders}
    samples = {name: [] for name in timers}
    for _ in range(reps):
        for name, timer in timers.items():
            samples[name].append(timer.timeit(calls[name]).median)
    return samples


def cuda_event_samples(fns, reps, warmup):
    """GPU time per call by CUDA events, one call per repetition, with L2 flushed before each call so every
    repetition starts from cold caches instead of reusing the previous call's data."""
    flush = torch.empty(2 * torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size,
                        dtype=torch.int8, device="cuda")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    events = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            flush.zero_()
            torch.cuda._sleep(GPU_SPIN_CYCLES)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: [start.elapsed_time(end) / 1e3 for start, end in pairs] for name, pairs in events.items()}
