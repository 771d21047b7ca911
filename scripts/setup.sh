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

# Fashion-MNIST: Debian's package where apt is usable, else torchvision's download when online.
if ! "$VENV/bin/python" -c "from mosaic_flwr.data import load_dataset; load_dataset('fmnist', '$ROOT/data')" 2>/dev/null; then
  SUDO=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
  if command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; }; then
    echo "[setup] installing Debian's dataset-fashion-mnist"
    $SUDO apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null || true
  fi
  if ! "$VENV/bin/python" -c "from mosaic_flwr.data import load_dataset; load_dataset('fmnist', '$ROOT/data')" 2>/dev/null; then
    echo "[setup] trying torchvision's download of Fashion-MNIST into $ROOT/data"
    if ! "$VENV/bin/python" -c "from mosaic_flwr.data import load_dataset; load_dataset('fmnist', '$ROOT/data', download=True)"; then
      echo "[setup] ERROR: Fashion-MNIST is not available: install Debian's dataset-fashion-mnist" >&2
      echo "        (files in /usr/share/datasets/fashion-mnist) or put the four IDX files in $ROOT/data/fashion-mnist" >&2
      exit 1
    fi
  fi
fi
echo "[setup] ready: $VENV"
