#!/usr/bin/env bash
# Idempotent setup: a virtualenv with the pinned dependencies, and the Fashion-MNIST files.
# Fast when already done (a stamp records the pyproject.toml it installed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MOSAIC_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.mosaic-flwr-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup] installing dependencies (torch 2.14.1, torchvision 0.29.1, flwr[simulation] 1.42; a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
  echo "$want" > "$STAMP"
fi

# Fashion-MNIST where the app finds it without data-dir (scripts/setup_data.sh says where).
MOSAIC_VENV="$VENV" bash "$ROOT/scripts/setup_data.sh"
echo "[setup] ready: $VENV"
