"""The GPU check: everything the CUDA half needs proven on a real GPU, in one call, within a time budget, writing a
complete report even when steps fail.

    scripts/gpu_check.sh OUTDIR [--data-dir DIR] [--budget S] [--steps a,b] [--skip-build] [--self-test]

Steps, in order (each with a time limit, cut to what is left of the budget; a step whose prerequisite failed, or
for which no time is left, is skipped with the reason; every step writes OUTDIR/<step>.log):

  environment   GPU, driver, Python, torch, nvcc, setuptools, compute-sanitizer versions
  build         pip install --no-build-isolation --no-deps -e .  (no emulator: it is tested in CI)
  cuda_kernels  the build has CUDA kernels and torch sees a GPU: without both every CUDA test would skip and the
                check "pass", so this fails loudly and the GPU steps are skipped
  errors        an argument error raises ValueError on the CPU and on CUDA rather than crashing the process (a
                toolchain that links libstdc++ statically made every one a segfault; setup.py now avoids it)
  tests         pytest -m gpu: every test that needs the GPU (no -x); passed/failed/skipped per test file
  memcheck      compute-sanitizer --tool memcheck over scripts/sanitizer_case.py (every kernel, fp32/fp16/bf16)
  racecheck     compute-sanitizer --tool racecheck over the same cases
  large_index   scripts/sanitizer_case.py --large: one tensor of more than 2^31 elements
  train         python -m cnn_ext.train --device cuda, one epoch on real MNIST from --data-dir
  train_graphs  the same with --cuda-graphs
  benchmarks    python -m benchmarks.run --device cuda --json: every row, and the MNIST step's kernel count
  tiles         the convolution rows again with each larger implicit-GEMM tile (CNN_EXT_CUDA_TILE=128x64, 128x128),
                so one run shows where each beats the default 64x64

OUTDIR/summary.json holds each step's status, time and figures (test counts per file, sanitizer error counts,
accuracies and epoch times, the benchmark rows); the exit status is 0 only when every step that ran passed.
--self-test runs the same plumbing without a GPU (tests/test_gpu_check.py does, in CI): stand-in commands with the
real ones' output formats, a real pytest run of a few CPU tests, and one step that overruns its limit.
"""

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
BUDGET_S = 480  # 8 minutes, the build included
SUMMARY_RESERVE_S = 5  # kept back so that the summary is always written
SELF_TEST_LIMIT_S = 30  # no stand-in needs more; large_index's sleeps past its own 2 s
SELF_TEST_LIMITS = {"large_index": 2}

# name -> (time limit in seconds, steps that must have passed first)
STEPS = {
    "environment": (30, []),
    "build": (180, []),
    "cuda_kernels": (30, ["build"]),
    "errors": (30, ["cuda_kernels"]),
    "tests": (210, ["cuda_kernels"]),
    "memcheck": (75, ["cuda_kernels"]),
    "racecheck": (75, ["cuda_kernels"]),
    "large_index": (40, ["cuda_kernels"]),
    "train": (45, ["cuda_kernels"]),
    "train_graphs": (45, ["cuda_kernels"]),
    "benchmarks": (120, ["cuda_kernels"]),
    "tiles": (90, ["cuda_kernels"]),
}

ENVIRONMENT = r"""
import importlib.metadata as md, json, os, shutil, subprocess, sys, torch
def version(package):
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None
def command(*argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None
sanitizer = shutil.which("compute-sanitizer")
print(json.dumps({
    "python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "driver": command("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
    "nvcc": command("nvcc", "--version").splitlines()[-1] if shutil.which("nvcc") else None,
    "compute_sanitizer": sanitizer, "cc": os.environ.get("CC"), "cxx": os.environ.get("CXX"),
    **{name: version(name) for name in ("setuptools", "pytest", "hypothesis", "tqdm", "matplotlib", "torchvision",
                                         "ninja")}}))
"""

CUDA_KERNELS = r"""
import sys, torch, cnn_ext
has_kernels = torch._C._dispatch_has_kernel_for_dispatch_key("cnn_ext::conv2d", "CUDA")
problems = ([] if torch.cuda.is_available() else ["torch sees no CUDA GPU"]) + \
           ([] if has_kernels else ["cnn_ext was built without CUDA kernels (was nvcc found? see build.log)"])
print("; ".join(problems) or f"CUDA kernels built and {torch.cuda.get_device_name(0)} visible")
sys.exit(1 if problems else 0)
"""

ERRORS = r"""
import faulthandler, sys, torch
faulthandler.enable()
import cnn_ext
failures = []
for device in ("cpu", "cuda"):
    x, w = torch.randn(1, 2, 5, 5, device=device), torch.randn(3, 2, 3, device=device)
    for name, call in [("conv2d, 3-D weight", lambda: cnn_ext.functional.conv2d(x, w)),
                       ("max_pool2d, kernel_size 0",
                        lambda: torch.ops.cnn_ext.max_pool2d(x, [0, 2], [2, 2], [0, 0], [1, 1], False))]:
        print(f"{device}: {name}", flush=True)
        try:
            call()
        except ValueError as e:
            print(f"    ValueError: {str(e).splitlines()[0][:150]}", flush=True)
        else:
            failures.append(f"{device}: {name} raised nothing")
print("; ".join(failures) or "argument errors raise ValueError on the CPU and on CUDA")
sys.exit(1 if failures else 0)
"""


def junit(out):
    """pytest's JUnit report, in the format that names each test's file."""
    return [f"--junitxml={os.path.join(out, 'pytest.xml')}", "-o", "junit_family=xunit1"]


def real_commands(out, data_dir):
    sanitizer = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",
                     "/usr/local/cuda/compute-sanitizer/compute-sanitizer") if os.path.exists(p)), None)
    # Only our kernels are checked; separate allocations let memcheck see out-of-bounds accesses that PyTorch's
    # caching allocator would otherwise hide inside a pooled block.
    sanitize = None if sanitizer is None else [sanitizer, "--kernel-name", "kns=cnn_ext", "--error-exitcode", "1"]
    train = [PYTHON, "-m", "cnn_ext.train", "--device", "cuda", "--epochs", "1", "--data-dir", data_dir]
    return {
        "environment": [PYTHON, "-c", ENVIRONMENT],
        "build": [PYTHON, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "-e", "."],
        "cuda_kernels": [PYTHON, "-c", CUDA_KERNELS],
        "errors": [PYTHON, "-c", ERRORS],
        # -v streams each test's outcome into tests.log, so that a step cut off at its limit (when pytest writes no
        # JUnit report) still says what ran; pytest-timeout, where installed, stops a hung test rather than the step;
        # pytest-xdist, where installed, runs the tests in worker processes, so that one that kills its process (as
        # every argument error did on the first GPU run) is reported as an error and the rest still run.
        "tests": [PYTHON, "-m", "pytest", "-v", "--tb=short", "--durations=25", "-m", "gpu", "-p", "no:cacheprovider",
                  *(["--timeout", "60"] if importlib.util.find_spec("pytest_timeout") else []),
                  *(["-n", "4", "--max-worker-restart", "100"] if importlib.util.find_spec("xdist") else []),
                  *junit(out)],
        "memcheck": sanitize and sanitize + ["--tool", "memcheck", PYTHON, "scripts/sanitizer_case.py"],
        "racecheck": sanitize and sanitize + ["--tool", "racecheck", PYTHON, "scripts/sanitizer_case.py",
                                              "--racecheck"],
        "large_index": [PYTHON, "scripts/sanitizer_case.py", "--large"],
        "train": train + ["--log-json", os.path.join(out, "train.json")],
        "train_graphs": train + ["--cuda-graphs", "--log-json", os.path.join(out, "train_graphs.json")],
        "benchmarks": [PYTHON, "-m", "benchmarks.run", "--device", "cuda", "--repeat", "30", "--json",
                       os.path.join(out, "bench.json")],
        "tiles": ["bash", "-c", " && ".join(
            f"CNN_EXT_CUDA_TILE={tile} {shlex.quote(PYTHON)} -m benchmarks.run --device cuda --ops conv --repeat 20 "
            f"--json {shlex.quote(os.path.join(out, f'tiles_{tile}.json'))}" for tile in TILES)],
    }


TILES = ("128x64", "128x128")


def self_test_commands(out, data_dir):
    """Stand-ins for a machine without a GPU, printing or writing what the real commands do, so that every parser
    and the summary are exercised."""
    def script(code):
        return [PYTHON, "-c", code]

    def write_json(path, value):
        return script(f"import json; json.dump({value!r}, open({path!r}, 'w'))")

    train_log = {"epochs": [{"epoch": 1, "test_accuracy": 97.5, "time_s": 1.25, "images_per_s": 48000.0}]}
    return {
        "environment": [PYTHON, "-c", ENVIRONMENT],
        "build": script("print('stand-in build')"),
        "cuda_kernels": script("print('stand-in: CUDA kernels built and a GPU visible')"),
        "errors": script("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"),  # as the crash seen once
        # A real pytest run: a few quick CPU tests, one file of them skipped, through the same JUnit parser.
        "tests": [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_build.py",
                  "tests/test_emulator.py::test_barrier_reductions", "tests/test_emulator.py::test_wrong_index_is_caught",
                  "tests/test_cuda.py::test_kernels_run_on_the_current_stream", *junit(out)],
        "memcheck": script("print('========= ERROR SUMMARY: 0 errors')"),
        "racecheck": script("print('========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)'); "
                            "import sys; sys.exit(1)"),
        "large_index": script("import time; time.sleep(60)"),  # overruns its limit
        "train": write_json(os.path.join(out, "train.json"), train_log),
        "train_graphs": write_json(os.path.join(out, "train_graphs.json"), train_log),
        "benchmarks": write_json(os.path.join(out, "bench.json"),
                                 {"rows": [{"case": "mnist.train_step", "ratio": 0.4, "kernels": {"ours": 6}}]}),
        "tiles": script("; ".join(
            f"import json; json.dump({{'rows': [{{'case': 'resnet.3x3_64', 'op': 'conv2d.fwd', 'dtype': 'float32', "
            f"'ratio': {ratio}}}]}}, open({os.path.join(out, f'tiles_{tile}.json')!r}, 'w'))"
            for tile, ratio in zip(TILES, (1.2, 0.9)))),
    }


# ---------------------------------------------------------------------------------------------------------------
# What each step's output says.
# ---------------------------------------------------------------------------------------------------------------

def tests_by_file(junit_path):
    """{test file: {passed, failed, errors, skipped}} from pytest's JUnit XML."""
    files = {}
    for case in ET.parse(junit_path).getroot().iter("testcase"):
        counts = files.setdefault(case.get("file"), {"passed": 0, "failed": 0, "errors": 0, "skipped": 0})
        kinds = {child.tag for child in case}
        if "failure" in kinds:
            counts["failed"] += 1
        elif "error" in kinds:
            counts["errors"] += 1
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return files


def parse_tests(out, step):
    path = os.path.join(out, "pytest.xml")
    if not os.path.exists(path):
        return "pytest wrote no report"
    files = tests_by_file(path)
    step["by_file"] = files
    step["counts"] = {key: sum(f[key] for f in files.values()) for key in ("passed", "failed", "errors", "skipped")}
    if step["counts"]["passed"] == 0:
        return "no test passed: every GPU test was skipped or failed"
    return None


def parse_sanitizer(out, step, name):
    text = open(os.path.join(out, f"{name}.log"), errors="replace").read()
    found = re.findall(r"(?:ERROR|RACECHECK) SUMMARY: (\d+)", text)
    step["sanitizer_errors"] = int(found[-1]) if found else None
    hazards = re.findall(r"\((\d+) errors?, (\d+) warnings?\)", text)
    if hazards:
        step["sanitizer_errors"] = int(hazards[-1][0])
        step["sanitizer_warnings"] = int(hazards[-1][1])
    if found and not hazards:
        step["sanitizer_warnings"] = 0
    if step["sanitizer_errors"] is None:
        return "the sanitizer printed no summary"
    return f"{step['sanitizer_errors']} sanitizer errors" if step["sanitizer_errors"] else None


def parse_train(out, step, name):
    path = os.path.join(out, f"{name}.json")
    if not os.path.exists(path):
        return "the trainer wrote no log"
    epochs = json.load(open(path))["epochs"]
    step["test_accuracy"] = [e["test_accuracy"] for e in epochs]
    step["epoch_seconds"] = [e["time_s"] for e in epochs]
    step["images_per_s"] = [e["images_per_s"] for e in epochs]
    return None


def parse_benchmarks(out, step):
    path = os.path.join(out, "bench.json")
    if not os.path.exists(path):
        return "the benchmarks wrote no JSON"
    rows = json.load(open(path))["rows"]
    step["rows"] = rows
    step["train_step_kernels"] = next((r.get("kernels") for r in rows if r["case"] == "mnist.train_step"), None)
    return None


def parse_tiles(out, step):
    """{tile: {"case op dtype": ratio}} from the tile runs' JSON."""
    step["ratios"] = {}
    for tile in TILES:
        path = os.path.join(out, f"tiles_{tile}.json")
        if not os.path.exists(path):
            return f"no JSON for tile {tile}"
        step["ratios"][tile] = {f"{r['case']} {r['op']} {r['dtype']}": r.get("ratio")
                                for r in json.load(open(path))["rows"]}
    return None


PARSERS = {
    "tests": parse_tests,
    "memcheck": lambda out, step: parse_sanitizer(out, step, "memcheck"),
    "racecheck": lambda out, step: parse_sanitizer(out, step, "racecheck"),
    "train": lambda out, step: parse_train(out, step, "train"),
    "train_graphs": lambda out, step: parse_train(out, step, "train_graphs"),
    "benchmarks": parse_benchmarks,
    "tiles": parse_tiles,
}


# ---------------------------------------------------------------------------------------------------------------
# Running.
# ---------------------------------------------------------------------------------------------------------------

class Check:
    def __init__(self, out, budget, log, self_test):
        self.out, self.deadline, self.log_file, self.self_test = out, time.monotonic() + budget, log, self_test
        self.steps = {}

    def log(self, text):
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def skip(self, name, reason):
        self.steps[name] = {"status": "skipped", "reason": reason, "seconds": 0}
        self.log(f"step {name}: skipped ({reason})")

    def run(self, name, command, env, unavailable=None):
        limit, needs = STEPS[name]
        failed_needs = [n for n in needs if self.steps.get(n, {}).get("status") not in ("passed", None)]
        if failed_needs:
            return self.skip(name, f"{', '.join(failed_needs)} did not pass")
        if unavailable:
            return self.skip(name, unavailable)
        if command is None:
            return self.skip(name, "compute-sanitizer not found")
        left = self.deadline - time.monotonic() - SUMMARY_RESERVE_S
        if left < 5:
            return self.skip(name, "no time left in the budget")
        if self.self_test:
            limit = SELF_TEST_LIMITS.get(name, SELF_TEST_LIMIT_S)
        limit = min(limit, int(left))
        shown = " ".join("<script>" if "\n" in arg else arg for arg in command)
        self.log(f"step {name} (limit {limit}s): {shown}")
        start = time.monotonic()
        with open(os.path.join(self.out, f"{name}.log"), "w") as log:
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                code = process.wait(timeout=limit)
                status = "passed" if code == 0 else "failed"
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)  # the whole process group: pytest's or the sanitizer's children too
                code, status = process.wait(), "timeout"
        step = {"status": status, "exit_code": code, "seconds": round(time.monotonic() - start, 1), "limit": limit}
        if status == "failed" and code < 0:
            step["problem"] = f"the process was killed by signal {-code} ({signal.Signals(-code).name})"
        self.steps[name] = step
        if name in PARSERS and status != "timeout":
            try:
                problem = PARSERS[name](self.out, step)
            except (OSError, ValueError, KeyError, ET.ParseError) as e:
                problem = f"its output could not be read: {type(e).__name__}: {e}"
            if problem:
                step["problem"] = problem
                step["status"] = "failed"
        if name == "environment" and status == "passed":
            step["versions"] = json.loads(open(os.path.join(self.out, "environment.log")).read().splitlines()[-1])
        self.log(f"step {name}: {step['status']} (exit {code}, {step['seconds']}s)"
                 + (f": {step['problem']}" if "problem" in step else ""))
        tail = open(os.path.join(self.out, f"{name}.log"), errors="replace").read().splitlines()[-4:]
        for line in tail:
            self.log(f"    {line[:200]}")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("outdir", help="where the logs and summary.json go (created)")
    parser.add_argument("--data-dir", default=os.environ.get("CNN_EXT_DATA_DIR")
                        or os.path.join(os.path.expanduser("~"), ".cache", "cnn_ext", "mnist"),
                        help="MNIST in torchvision's layout, for the training steps and tests "
                             "(default: $CNN_EXT_DATA_DIR or ~/.cache/cnn_ext/mnist)")
    parser.add_argument("--budget", type=int, default=BUDGET_S, help="seconds for all steps (default %(default)s)")
    parser.add_argument("--steps", help=f"comma-separated subset of {','.join(STEPS)} (e.g. to rerun failures)")
    parser.add_argument("--skip-build", action="store_true", help="use the extension already built in place")
    parser.add_argument("--self-test", action="store_true",
                        help="exercise the check's own plumbing with stand-in commands (no GPU needed)")
    args = parser.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",")] if args.steps else list(STEPS)
    unknown = set(args.steps) - set(STEPS)
    if unknown:
        parser.error(f"--steps: unknown {sorted(unknown)}; choose from {','.join(STEPS)}")
    if args.skip_build and "build" in args.steps:
        args.steps.remove("build")
    if args.budget < 30:
        parser.error("--budget: at least 30 seconds")
    return args


def main(argv=None):
    args = parse_args(argv)
    out = os.path.abspath(args.outdir)
    os.makedirs(out, exist_ok=True)
    data_dir = os.path.abspath(args.data_dir)
    env = dict(os.environ, CNN_EXT_DATA_DIR=data_dir, CNN_EXT_NO_EMULATOR="1", MAX_JOBS=os.environ.get("MAX_JOBS", "16"),
               PYTHONUNBUFFERED="1")
    if not args.self_test:
        cuda_home = env.setdefault("CUDA_HOME", "/usr/local/cuda")
        env["PATH"] = os.path.join(cuda_home, "bin") + os.pathsep + env.get("PATH", "")
    commands = (self_test_commands if args.self_test else real_commands)(out, data_dir)
    started = time.time()
    with open(os.path.join(out, "gpu_check.log"), "w") as log:
        check = Check(out, args.budget, log, args.self_test)
        check.log(f"cnn_ext gpu_check{' (self-test)' if args.self_test else ''} in {ROOT}; python {PYTHON}; "
                  f"data {data_dir}; budget {args.budget}s; steps {','.join(args.steps)}")
        no_mnist = None
        if not args.self_test and not os.path.exists(os.path.join(data_dir, "MNIST", "raw", "train-images-idx3-ubyte")):
            no_mnist = f"no MNIST under {data_dir}/MNIST/raw (give one with --data-dir)"
            check.log(f"note: {no_mnist}: the training steps are skipped, the tests that need it skip")
        for name in args.steps:
            check.run(name, commands[name], env, no_mnist if name in ("train", "train_graphs") else None)
        ok = all(s["status"] in ("passed", "skipped") for s in check.steps.values()) and all(
            s["status"] == "passed" for n, s in check.steps.items() if n in ("build", "cuda_kernels"))
        summary = {"ok": ok, "self_test": args.self_test, "started": time.strftime("%Y-%m-%d %H:%M:%S",
                                                                                    time.localtime(started)),
                   "seconds": round(time.time() - started, 1), "budget": args.budget, "data_dir": data_dir,
                   "steps": check.steps}
        tmp = os.path.join(out, "summary.json.tmp")
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(tmp, os.path.join(out, "summary.json"))
        check.log(f"gpu_check: {'passed' if ok else 'FAILED'} in {summary['seconds']}s; summary: "
                  f"{os.path.join(out, 'summary.json')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
