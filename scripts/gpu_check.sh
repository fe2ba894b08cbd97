#!/usr/bin/env bash
# GPU check for cnn_ext, for a machine with an NVIDIA GPU and the dependencies preinstalled (no network needed).
#
#   scripts/gpu_check.sh OUTDIR
#
# Steps (each time-limited; later steps run even when earlier ones fail):
#   build        pip install --no-build-isolation -e .   (in place, MAX_JOBS=16)
#   tests        pytest on the CUDA tests (-k cuda; the whole suite if no test id mentions cuda)
#   memcheck     compute-sanitizer --tool memcheck  on scripts/sanitizer_case.py
#   racecheck    compute-sanitizer --tool racecheck on scripts/sanitizer_case.py
#   fused_memcheck, fused_racecheck   the same two tools on the fused conv2d_maxpool_relu kernel (FUSED_CASE below)
#   large_index  scripts/sanitizer_case.py --large  (the 64-bit index path)
#   benchmarks   python -m benchmarks.run --device cuda, if benchmarks/run.py exists
# Writes OUTDIR/gpu_check.log, one OUTDIR/<step>.log per step, and OUTDIR/summary.json. Exits 1 if any step failed.
# The limits add up to under 8 minutes (150 + 90 + 60 + 60 + 25 + 25 + 25 + 40 = 475 s).
set -u

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-16}
export PATH="$CUDA_HOME/bin:$PATH"
LOG="$OUT/gpu_check.log"
: > "$LOG"
: > "$OUT/steps.tsv"

log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

# run_step NAME LIMIT_SECONDS COMMAND...: runs with a time limit, output to OUTDIR/NAME.log, records the outcome.
run_step() {
  local name=$1 limit=$2
  shift 2
  log "step $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local status=passed
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout; elif [ $rc -ne 0 ]; then status=failed; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - start))" >> "$OUT/steps.tsv"
  log "step $name: $status (rc=$rc, $((SECONDS - start))s)"
  tail -n 5 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$LOG"
  return $rc
}

skip_step() {
  printf '%s\tskipped\t-\t0\t%s\n' "$1" "$2" >> "$OUT/steps.tsv"
  log "step $1: skipped ($2)"
}

log "cnn_ext gpu_check in $(pwd), CUDA_HOME=$CUDA_HOME"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$LOG" 2>&1
python -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' >> "$LOG" 2>&1

# The fused kernel's shapes: MNIST's two layers, grouped with padding and ceil_mode, and weights too many for
# shared memory (C/groups*R*S > 4096, read from global memory); float32 and float16.
FUSED_CASE='import torch, cnn_ext
ops = torch.ops.cnn_ext
for n, c, k, g, r, hw in ((4, 1, 10, 1, 5, 28), (4, 10, 20, 1, 5, 12), (2, 6, 6, 3, 3, 9), (1, 460, 3, 1, 3, 6)):
    for dt in (torch.float32, torch.float16):
        x = torch.randn(n, c, hw, hw, device="cuda", dtype=dt)
        w, b = torch.randn(k, c // g, r, r, device="cuda", dtype=dt), torch.randn(k, device="cuda", dtype=dt)
        ops.conv2d_maxpool_relu(x, w, b, [1, 1], [1, 1], [1, 1], g, [2, 2], [2, 2], [1, 1], [1, 1], True)
torch.cuda.synchronize()
print("fused case ok")'

if run_step build 150 python -m pip install --no-build-isolation --no-deps -e .; then
  run_step tests 90 python -m pytest -x -q tests -k cuda --junitxml="$OUT/pytest.xml" -p no:cacheprovider
  if [ "$(cut -f3 "$OUT/steps.tsv" | tail -n 1)" = 5 ]; then  # pytest: nothing selected, so run everything
    sed -i '$d' "$OUT/steps.tsv"
    run_step tests 90 python -m pytest -x -q tests --junitxml="$OUT/pytest.xml" -p no:cacheprovider
  fi

  SANITIZER=$(command -v compute-sanitizer || ls "$CUDA_HOME"/bin/compute-sanitizer \
              "$CUDA_HOME"/compute-sanitizer/compute-sanitizer 2>/dev/null | head -n 1)
  if [ -n "$SANITIZER" ]; then
    # Only our kernels are checked where the sanitizer can filter; separate allocations let memcheck see
    # out-of-bounds accesses that PyTorch's caching allocator would otherwise hide inside a pooled block.
    FILTER=()
    if "$SANITIZER" --help 2>/dev/null | grep -q -- '--kernel-name'; then FILTER=(--kernel-name kns=cnn_ext); fi
    for tool in memcheck racecheck; do
      run_step "$tool" 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" \
        ${FILTER[@]+"${FILTER[@]}"} --error-exitcode 1 python scripts/sanitizer_case.py
    done
    for tool in memcheck racecheck; do
      run_step "fused_$tool" 25 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" \
        ${FILTER[@]+"${FILTER[@]}"} --error-exitcode 1 python -c "$FUSED_CASE"
    done
  else
    skip_step memcheck "compute-sanitizer not found"
    skip_step racecheck "compute-sanitizer not found"
    skip_step fused_memcheck "compute-sanitizer not found"
    skip_step fused_racecheck "compute-sanitizer not found"
  fi

  run_step large_index 25 python scripts/sanitizer_case.py --large

  if [ -f benchmarks/run.py ]; then
    run_step benchmarks 40 python -m benchmarks.run --device cuda --json "$OUT/bench.json"
  else
    skip_step benchmarks "benchmarks/run.py is absent"
  fi
else
  for step in tests memcheck racecheck large_index benchmarks; do skip_step "$step" "build failed"; done
  for step in fused_memcheck fused_racecheck; do skip_step "$step" "build failed"; done
fi

# summary.json: each step's outcome and time, pytest counts (from the JUnit XML), sanitizer verdicts.
python - "$OUT" << 'EOF' | tee -a "$LOG"
import json, os, re, sys
import xml.etree.ElementTree as ET

out = sys.argv[1]
steps = {}
for line in open(os.path.join(out, "steps.tsv")):
    name, status, rc, seconds, *reason = line.rstrip("\n").split("\t")
    steps[name] = {"status": status, "exit_code": None if rc == "-" else int(rc), "seconds": int(seconds)}
    if reason:
        steps[name]["reason"] = reason[0]

junit = os.path.join(out, "pytest.xml")
if "tests" in steps and os.path.exists(junit):
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    root = ET.parse(junit).getroot()
    for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    steps["tests"]["counts"] = counts

for tool in ("memcheck", "racecheck", "fused_memcheck", "fused_racecheck"):
    path = os.path.join(out, f"{tool}.log")
    if tool in steps and os.path.exists(path):
        text = open(path, errors="replace").read()
        found = re.findall(r"ERROR SUMMARY: (\d+) error", text)
        steps[tool]["sanitizer_errors"] = int(found[-1]) if found else None
        steps[tool]["verdict"] = "clean" if found and int(found[-1]) == 0 and steps[tool]["status"] == "passed" else "dirty"

summary = {"ok": all(s["status"] in ("passed", "skipped") for s in steps.values()), "steps": steps}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
print(json.dumps(summary, indent=2))
EOF

if grep -q -P '\t(failed|timeout)\t' "$OUT/steps.tsv"; then
  log "gpu_check: FAILED"
  exit 1
fi
log "gpu_check: passed"
exit 0
