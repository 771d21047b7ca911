#!/usr/bin/env bash
# Set up (idempotent), then run the whole test suite (slow end-to-end runs included).
# Quick loop: bash scripts/test.sh -m "not slow"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
VENV="${MOSAIC_VENV:-$ROOT/.venv}"
cd "$ROOT"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0
# Two workers (pytest-xdist) on the 2-core CI machine; the tests that start Ray or network
# namespaces share one worker (tests/conftest.py). TEST_WORKERS=0 runs in this process alone.
exec "$VENV/bin/python" -m pytest -n "${TEST_WORKERS:-2}" --dist loadgroup "$@"
