#!/usr/bin/env bash
# Set up (idempotent: venv, Fashion-MNIST, MNIST, CIFAR-10, nginx where apt is usable), then run the whole test suite (slow end-to-end runs included).
# Quick loop: bash scripts/test.sh -m "not slow"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Every data set the tests read, through the same fetch code users run, before pytest starts.
# A local copy of MNIST beside the project (../shared/data/mnist, as the project's CI machines
# lay it out) is used as a source when it exists; it is never required.
SETUP=(--data mnist --data cifar10 --deploy)
if [ -d "$ROOT/../shared/data/mnist" ]; then SETUP+=(--data-from "$ROOT/../shared/data/mnist"); fi
bash "$ROOT/scripts/setup.sh" "${SETUP[@]}"
VENV="${MOSAIC_VENV:-$ROOT/.venv}"
cd "$ROOT"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0
# Two workers (pytest-xdist) on the 2-core CI machine; the tests that start Ray or network
# namespaces share one worker (tests/conftest.py). TEST_WORKERS=0 runs in this process alone.
exec "$VENV/bin/python" -m pytest -n "${TEST_WORKERS:-2}" --dist loadgroup "$@"
