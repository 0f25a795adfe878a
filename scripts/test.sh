#!/usr/bin/env bash
# The test command: set-up, lint, format check, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv="${NAS_VENV:-.venv}"
# No telemetry, no token files or results written into the home directory by the tools under test.
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled MLFLOW_DISABLE_TELEMETRY=true
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
# The package's layers (pyproject.toml's [tool.importlinter] contracts): no upward import, no
# cycle, nothing of Ray or MLflow below the tracking and pipeline layers. It writes its cache
# under .import_linter_cache (git-ignored), not into the home directory.
"$venv/bin/lint-imports"
# Every function <= 80 lines and every file <= 400 in nas/, trainers/ and benchmarks/.
"$venv/bin/python" scripts/sizes.py
# Two workers (NAS_TEST_WORKERS): half the suite's time is Ray and MLflow starting up and
# waiting, which the other worker's tests fill. Tests sharing a costly fixture (an end-to-end
# run) carry one xdist_group, so it runs once, on one worker.
"$venv/bin/python" -m pytest -n "${NAS_TEST_WORKERS:-2}" --dist loadgroup "$@"
