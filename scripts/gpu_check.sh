#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py: its --help lists the steps). Runs with python3, or python where that is all
# there is.
#
#   scripts/gpu_check.sh OUTDIR [--data-dir DIR] [--budget S] [--steps a,b] [--skip-build] [--self-test]
set -u
PY=$(command -v python3 || command -v python) || { echo "gpu_check: no python3 or python on PATH" >&2; exit 2; }
exec "$PY" "$(dirname "$0")/gpu_check.py" "$@"
