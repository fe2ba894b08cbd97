"""Benchmark cnn_ext's operators and training steps (the MNIST seed model's, DeepMNIST's) against torch's built-ins.

    python -m benchmarks.run [--device cpu|cuda] [--ops conv,pool,norm,train,models] [--quick] [--json PATH]
                             [--plot PATH] [--repeat N] [--threads N] [--cpu-peak-gflops X]
                             [--float32-matmul-precision P] [--batch FAMILY=N ...] [--thread-scaling]

Every row is validated against torch before it is timed, then ours and torch's are timed interleaved (see
timing.py). CPU: torch.utils.benchmark.Timer with torch's threads (or --threads). GPU: CUDA events around each op
with L2 flushed before it, fp32 with TF32 off, plus bf16 rows; the train step and the whole torchvision models
(`--ops models`, opt-in: cnn_ext.convert'ed against unconverted) are timed by wall clock on both.
Prints the machine, then a table; exits with status 1 if any of our results failed validation (speed targets only
inform).
"""

import argparse
import functools
import os
import sys
from types import SimpleNamespace

import torch

import cnn_ext  # noqa: F401  (registers torch.ops.cnn_ext)

from . import cases, models, ops, report, timing, train

SECTIONS = ("conv", "pool", "norm", "train", "models")
DEFAULT_SECTIONS = ("conv", "pool", "norm", "train")  # "models" (whole torchvision networks) takes minutes: opt-in

# Repetitions (each timing ours and torch once) and, for wall-clock timing, the length of one repetition's block
# of calls. --quick is a smoke test of every row (~60 s on 2 cores), not a measurement.
REPS = {("cpu", False): 15, ("cpu", True): 2, ("cuda", False): 100, ("cuda", True): 5}
BLOCK_S = {False: 0.02, True: 0.002}
WARMUP = {False: 3, True: 1}
# --thread-scaling: a conv row whose op ran less than this much faster on all threads than on one is reported as
# timed while the threads did not all run (the 2-core development machine: 1.5-1.95x normally, 1.0-1.2x then).
SCALED_CONV = 1.3


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", default=",".join(DEFAULT_SECTIONS),
                        help="comma-separated subset of conv,pool,norm,train,models (default: conv,pool,norm,train; "
                             "norm: CPU only)")
    parser.add_argument("--quick", action="store_true", help="every row, few repetitions, small CPU batches")
    parser.add_argument("--json", metavar="PATH", help="write machine, settings and rows as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG chart of the time ratios")
    parser.add_argument("--repeat", type=int, metavar="N", help="repetitions per row (default: by device/--quick)")
    parser.add_argument("--batch", action="append", default=[], metavar="FAMILY=N",
                        help="batch size of a shape family's rows (mnist, deep, resnet; repeatable), e.g. resnet=1 "
                             "for the ResNet rows at batch 1 with full timing blocks (default: by device/--quick)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for torch and our kernels (default: torch's); on a shared machine, 1 "
                             "avoids OpenMP threads waiting on descheduled peers")
    parser.add_argument("--cpu-peak-gflops", type=float, default=cases.CPU_PEAK_FLOPS / 1e9,
                        help="the whole CPU's fp32 peak, for the %% of peak column; scaled by the share of CPUs "
                             "used (default: %(default)s, MKL sgemm measured on the 2-core development machine)")
    parser.add_argument("--float32-matmul-precision", choices=("highest", "high", "medium"), default="highest",
                        help="torch.set_float32_matmul_precision for the run (CPU only): below 'highest' our 3x3 "
                             "convolutions may take Winograd's 4x4 tiles (float32 error about 2.5e-6 of the outputs' "
                             "scale); torch's CPU convolutions stay IEEE float32 (torch.backends.mkldnn.conv)")
    parser.add_argument("--thread-scaling", action="store_true",
                        help="CPU, more than one thread: also time our op of every conv, pool and norm row on one "
                             "thread, in the same interleaved repetitions (column thr×: how much faster the threads "
                             "made it). On a shared machine the threads sometimes run no faster than one: conv rows "
                             "normally scale 1.5-1.95x, and a row timed while they did not is pessimistic for ours")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.ops.split(",") if s.strip()]
    args.batches = {}
    families = sorted({family for _, family in cases.BATCH})
    for item in args.batch:
        family, _, size = item.partition("=")
        if family not in families or not size.isdigit() or int(size) < 1:
            parser.error(f"--batch {item!r}: expected FAMILY=N with FAMILY one of {','.join(families)} and N >= 1")
        args.batches[family] = int(size)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"--ops: unknown {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    if args.device == "cuda" and args.float32_matmul_precision != "highest":
        parser.error("--float32-matmul-precision: CUDA rows compare IEEE float32 (TF32 off)")
    if args.thread_scaling and (args.device == "cuda" or (args.threads or torch.get_num_threads()) < 2):
        parser.error("--thread-scaling: needs the CPU device and at least 2 threads (--threads N)")
    return args


def main(argv=None):
    args = parse_args(argv)
    device, quick = args.device, args.quick
    torch.manual_seed(0)
    torch.set_float32_matmul_precision(args.float32_matmul_precision)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda":
        # fp32 rows compare true fp32 arithmetic (cuDNN and cuBLAS may not use TF32); cuDNN picks its fastest
        # algorithm per shape (autotuned during warm-up), the strongest baseline.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    cpu_share = min(torch.get_num_threads(), os.cpu_count()) / os.cpu_count()
    batches = {family: args.batches.get(family, n) for (d, family), n in
               (cases.QUICK_BATCH if quick else cases.BATCH).items() if d == device}
    settings = SimpleNamespace(quick=quick, reps=args.repeat or REPS[(device, quick)], batches=batches,
                               cpu_peak_flops=args.cpu_peak_gflops * 1e9 * cpu_share)
    wallclock = functools.partial(timing.wallclock_samples, device=device, reps=settings.reps,
                                  block_s=BLOCK_S[quick], warmup=WARMUP[quick])
    op_timer = (functools.partial(timing.cuda_event_samples, reps=settings.reps, warmup=WARMUP[quick])
                if device == "cuda" else functools.partial(wallclock, one_thread=("ours",) if args.thread_scaling
                                                           else ()))

    machine = report.machine_info(device)
    device_name = machine.get("gpu", machine["cpu"])
    config = {"device": device, "sections": args.sections, "quick": quick, "reps": settings.reps,
              "batches": {f"{device}/{family}": n for family, n in batches.items()},
              "train_batch": cases.TRAIN_BATCH, "cpu_peak_gflops_used": settings.cpu_peak_flops / 1e9,
              "float32_matmul_precision": args.float32_matmul_precision, "thread_scaling": args.thread_scaling,
              "timing": "CUDA events, L2 flushed per call (train step: wall clock)" if device == "cuda"
              else "torch.utils.benchmark.Timer, interleaved blocks"}
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    print("config:  " + ", ".join(f"{k}={v}" for k, v in config.items()))
    print("ratio = ours time / torch time (medians); rates in GFLOP/s (conv) or GB/s (pool); speed PASS = ratio <= "
          "target; ±iqr = the noisier side's interquartile range / median; thr× = ours on one thread / ours "
          "(--thread-scaling)")
    print(report.format_table([]))

    def log(row):
        print(report.format_table([row]).split("\n", 1)[1], flush=True)

    dtypes = [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]
    rows = ops.run(args.sections, device, dtypes, device_name, settings, op_timer, log)
    if "train" in args.sections:
        rows += train.run(device, wallclock, log)
    if "models" in args.sections:
        rows += models.run(device, wallclock, quick, log)

    passed = sum(r.passed for r in rows)
    invalid = [r for r in rows if r.check != "ok"]
    print(f"\n{passed}/{len(rows)} rows meet their speed target; {len(invalid)} failed validation")
    unscaled = [r for r in rows if r.section == "conv" and r.thread_speedup is not None
                and r.thread_speedup < SCALED_CONV]
    if unscaled:
        print(f"{len(unscaled)} conv rows ran less than {SCALED_CONV}x faster on {torch.get_num_threads()} threads "
              f"than on one (normally 1.5-1.95x): the machine's threads were not all running then, and those rows' "
              f"ratios are pessimistic for ours: " + ", ".join(f"{r.case} {r.op} {r.thread_speedup:.2f}x"
                                                                 for r in unscaled))
    if args.json:
        report.write_json(args.json, machine, config, rows)
    if args.plot:
        report.write_plot(args.plot, f"cnn_ext vs torch on {device_name} ({device})", rows)
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
