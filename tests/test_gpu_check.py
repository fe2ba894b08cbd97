"""scripts/gpu_check.sh's own plumbing, without a GPU, so that the check a GPU machine runs is known to work before
it runs there: arguments, time limits, skips, the parsing of every step's output and the summary (--self-test); the
loud failure of a build or machine without CUDA kernels; and the sanitizer cases' own checks, on the CPU emulator."""

import json
import os
import subprocess
import sys

import pytest

from cnn_ext import cuda_emulation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")


def _gpu_check(*args, env=None, timeout=600):
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=env or dict(os.environ), capture_output=True,
                          text=True, timeout=timeout)


def test_self_test_writes_a_complete_summary_with_only_python3(tmp_path):
    """A machine whose only Python is `python3`; stand-ins that pass, fail and overrun their limit. The summary
    holds every step, the per-file test counts of a real pytest run, the sanitizer verdicts and the figures."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    env = dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin")
    assert subprocess.run(["bash", "-c", "command -v python"], env=env, capture_output=True).returncode != 0 or \
        not os.path.exists("/usr/bin/python"), "this test needs a PATH without `python`"
    out = tmp_path / "out"
    result = _gpu_check(str(out), "--self-test", env=env)
    assert result.returncode == 1, result.stdout + result.stderr  # stand-ins fail, crash and overrun
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert not summary["ok"] and summary["self_test"]
    assert {name: step["status"] for name, step in steps.items()} == {
        "environment": "passed", "build": "passed", "cuda_kernels": "passed", "errors": "failed", "tests": "passed",
        "memcheck": "passed", "racecheck": "failed", "large_index": "timeout", "train": "passed",
        "train_graphs": "passed", "benchmarks": "passed", "tiles": "passed"}
    assert steps["environment"]["versions"]["python"] == "%d.%d.%d" % sys.version_info[:3]
    assert steps["tests"]["by_file"] == {
        "tests/test_build.py": {"passed": 3, "failed": 0, "errors": 0, "skipped": 0},
        "tests/test_emulator.py": {"passed": 2, "failed": 0, "errors": 0, "skipped": 0},
        "tests/test_cuda.py": {"passed": 0, "failed": 0, "errors": 0, "skipped": 1}}
    assert steps["tests"]["counts"] == {"passed": 5, "failed": 0, "errors": 0, "skipped": 1}
    assert steps["errors"]["problem"] == "the process was killed by signal 11 (SIGSEGV)"
    assert steps["memcheck"]["sanitizer_errors"] == 0
    assert steps["racecheck"]["sanitizer_errors"] == 2 and steps["racecheck"]["problem"] == "2 sanitizer errors"
    assert steps["large_index"]["limit"] == 2
    assert steps["train"]["test_accuracy"] == [97.5] and steps["train_graphs"]["epoch_seconds"] == [1.25]
    assert steps["benchmarks"]["train_step_kernels"] == {"ours": 6}
    assert steps["tiles"]["ratios"] == {"128x64": {"resnet.3x3_64 conv2d.fwd float32": 1.2},
                                        "128x128": {"resnet.3x3_64 conv2d.fwd float32": 0.9}}
    for name in steps:
        assert (out / f"{name}.log").exists()
    log = (out / "gpu_check.log").read_text()
    assert "step large_index: timeout" in log and "gpu_check: FAILED" in log


def test_no_cuda_kernels_fails_loudly(tmp_path):
    """On a machine without a GPU (or with a CPU-only build) the check fails, naming why, and skips the GPU steps
    instead of letting every CUDA test skip and "pass"."""
    out = tmp_path / "out"
    result = _gpu_check(str(out), "--skip-build", "--steps", "cuda_kernels,tests,train", "--budget", "60")
    assert result.returncode == 1
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert steps["cuda_kernels"]["status"] == "failed"
    assert "torch sees no CUDA GPU" in (out / "cuda_kernels.log").read_text()
    assert steps["tests"] == {"status": "skipped", "reason": "cuda_kernels did not pass", "seconds": 0}
    assert steps["train"]["status"] == "skipped"


def test_arguments_are_checked(tmp_path):
    result = _gpu_check(str(tmp_path), "--steps", "tests,sideways")
    assert result.returncode == 2 and "--steps: unknown ['sideways']" in result.stderr
    result = _gpu_check(str(tmp_path), "--budget", "5")
    assert result.returncode == 2 and "--budget" in result.stderr


@pytest.mark.skipif(not cuda_emulation.available(), reason="cnn_ext was built without the CUDA emulator")
@pytest.mark.parametrize("args", [[], ["--racecheck"], ["--large", "--large-shape", "1,2,40,41"]],
                         ids=["memcheck_cases", "racecheck_cases", "large_index_case"])
def test_sanitizer_cases_pass_on_the_emulator(args):
    """The cases the GPU check runs under compute-sanitizer (and its large-index case, shrunk, with 64-bit indices
    forced) are right on the emulated kernels: a mismatch on the GPU will be the GPU's."""
    # The checkout's cnn_ext, whether or not it is installed (a script's sys.path starts at scripts/).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "scripts/sanitizer_case.py", "--emulated", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 mismatches" in result.stdout


def test_missing_optional_packages_skip_only_their_tests(tmp_path):
    """A machine without tqdm, matplotlib, torchvision or hypothesis (the GPU machine may lack any): the suite still
    collects, the tests that need one skip with the reason, and the trainer's GPU tests are not stopped by it."""
    blocker = tmp_path / "sitecustomize.py"
    # Through __import__ (import statements, pytest.importorskip): pytest's assertion-rewriting import hook, ahead
    # of any meta-path finder, would import the plugin-providing hypothesis itself.
    blocker.write_text(
        "import builtins\n"
        "BLOCKED = {'tqdm', 'matplotlib', 'torchvision', 'hypothesis'}\n"
        "real_import = builtins.__import__\n"
        "def blocking_import(name, *args, **kwargs):\n"
        "    if name.split('.')[0] in BLOCKED:\n"
        "        raise ModuleNotFoundError(f'No module named {name!r} (blocked by the test)', name=name)\n"
        "    return real_import(name, *args, **kwargs)\n"
        "builtins.__import__ = blocking_import\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:hypothesispytest", "-p", "no:cacheprovider",
                             "-q", "-rs", "tests/test_fuzz.py", "tests/test_data.py", "tests/test_visualize.py",
                             "tests/test_train.py", "tests/test_distributed.py", "tests/test_build.py",
                             "tests/test_nn.py", "-k", "not state_dicts and not compile"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for reason in ("property-based tests need hypothesis", "cnn_ext.app.data reads MNIST with torchvision",
                   "the visualiser draws with matplotlib", "the trainer reads MNIST with torchvision"):
        assert reason in result.stdout
    assert " passed" in result.stdout.splitlines()[-1]  # test_build and the non-torchvision nn tests ran
