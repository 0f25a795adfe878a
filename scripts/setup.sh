#!/usr/bin/env bash
# Sets up the project in ./.venv (or $NAS_VENV): Python >= 3.11, the package in editable mode
# with its test tools. Safe to re-run; a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${NAS_VENV:-.venv}"

if [ ! -x "$venv/bin/python" ]; then
  py=""
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1 &&
       "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      py="$cand"; break
    fi
  done
  [ -n "$py" ] || { echo "setup: Python 3.11 or newer is needed (none found on PATH)" >&2; exit 1; }
  echo "setup: creating $venv with $($py --version)"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi

# Ray's usage statistics stay off for everything this venv runs.
export RAY_USAGE_STATS_ENABLED=0
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[dev,bench]"
# Data-only packages for mini-VTAB, without the dependencies they declare (animal-mnist's
# metadata pulls in tensorflow, which its data files do not need).
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
  "animal-mnist>=0.4" "elpv-dataset>=1.0"
echo "setup: ready ($("$venv/bin/python" -c 'import torch, timm; print(f"torch {torch.__version__}, timm {timm.__version__}")'))"
