"""`python -m benchmarks.run --quick` as a smoke test: every row runs, is checked against torch and is reported.
Speed is not asserted here (timings on a shared machine are noise for a test); the benchmark's own PASS/FAIL
column is for that."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_benchmarks_run_every_row_and_validate_it(tmp_path):
    out = tmp_path / "bench.json"
    args = [sys.executable, "-m", "benchmarks.run", "--quick", "--threads", "1", "--json", str(out)]
    plot = importlib.util.find_spec("matplotlib") is not None
    if plot:
        args += ["--plot", str(tmp_path / "bench.png")]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "0 failed validation" in result.stdout

    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {row["section"] for row in rows} == {"conv", "pool", "norm", "train"}
    assert {"deep.bn32", "deep.bn64"} <= {row["case"] for row in rows}
    assert {"mnist.train_step", "mnist.train_converted", "deep.train_step"} <= {row["case"] for row in rows}
    for row in rows:
        where = f"{row['case']} {row['op']}"
        assert row["check"] == "ok", where
        assert row["ours_s"] > 0 and row["torch_s"] > 0, where
        assert row["ratio"] == row["ours_s"] / row["torch_s"], where
    assert report["config"]["quick"] is True and report["machine"]["cnn_ext_cpu_isa"]
    if plot:
        assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_conv_rows_at_high_float32_matmul_precision(tmp_path):
    """`--float32-matmul-precision high` runs both sides under that setting (our 3x3 rows then take Winograd's 4x4
    tiles) and records it; every row still validates against torch."""
    out = tmp_path / "high.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--threads", "1", "--ops", "conv",
                             "--float32-matmul-precision", "high", "--json", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["config"]["float32_matmul_precision"] == "high"
    assert {row["case"] for row in report["rows"]} >= {"resnet.3x3_64", "resnet.3x3_128", "resnet.3x3_256"}
    assert all(row["check"] == "ok" for row in report["rows"])


def test_thread_scaling_times_ours_on_one_thread_too(tmp_path):
    """`--thread-scaling` times each conv row's op of ours on one thread as well, in the same repetitions, and
    reports the speedup the threads gave (thr×); it needs two threads or more."""
    out = tmp_path / "scaling.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--threads", "2", "--ops", "conv",
                             "--thread-scaling", "--json", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "thr×" in result.stdout
    report = json.loads(out.read_text())
    assert report["config"]["thread_scaling"] is True
    for row in report["rows"]:
        assert len(row["ours_one_thread_samples"]) == len(row["ours_samples"]) == report["config"]["reps"]
        assert row["thread_speedup"] > 0, row["case"]
    refused = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--threads", "1",
                              "--thread-scaling"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "--thread-scaling" in refused.stderr


def test_quick_models_section_runs_converted_torchvision_models(tmp_path):
    """`--ops models` (opt-in): resnet18, vgg11 and mobilenet_v2 through cnn_ext.convert, forward and forward +
    backward, each validated against the unconverted model."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("the models section needs torchvision")
    out = tmp_path / "models.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--threads", "1", "--ops", "models",
                             "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(row["case"], row["op"]) for row in rows} == {
        (f"model.{name}", op) for name in ("resnet18", "vgg11", "mobilenet_v2") for op in ("fwd", "fwd+bwd")}
    assert all(row["check"] == "ok" and row["ours_s"] > 0 for row in rows)
