#!/usr/bin/env bash
# Set up (idempotent), then run the main job: `flwr run .` in simulation, 10 clients,
# default configuration. Extra arguments go to scripts/flwr_sim.py, e.g.
#   bash scripts/run.sh --run-config "strategy='fedprox' alpha=0.1"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
VENV="${MOSAIC_VENV:-$ROOT/.venv}"
cd "$ROOT"
# A TOML string in quotes the path does not contain (Flower's --run-config parser allows no
# escapes: a project path holding both ' and " cannot be passed).
case "$ROOT" in *"'"*) OUT="\"$ROOT/outputs\"" ;; *) OUT="'$ROOT/outputs'" ;; esac
exec "$VENV/bin/python" scripts/flwr_sim.py --num-supernodes "${NUM_SUPERNODES:-10}" \
  --run-config "output-dir=$OUT" "$@"
