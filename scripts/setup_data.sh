#!/usr/bin/env bash
# Make sure Fashion-MNIST is where the app looks for it with data-dir empty (what plain
# `flwr run .` uses): $MOSAIC_FLWR_DATA, else ~/.cache/mosaic-flwr/data (XDG_CACHE_HOME
# respected), else Debian's /usr/share/datasets/fashion-mnist. Tries, in order: the files
# already there, Debian's dataset-fashion-mnist where apt is usable, torchvision's download
# into the user data directory. Called by scripts/setup.sh; needs the venv ($MOSAIC_VENV).
# Paths reach Python as arguments, never pasted into its source: any directory name works.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MOSAIC_VENV:-$ROOT/.venv}"

fmnist() {  # print the directory the app reads Fashion-MNIST from (exit 1: not there)
  "$VENV/bin/python" -c '
import sys
from mosaic_flwr.data.datasets import load_dataset
from mosaic_flwr.data.files import DatasetNotFoundError, fmnist_location, user_data_dir
try:
    load_dataset("fmnist", None)
except DatasetNotFoundError as exc:
    sys.exit(1)
print(fmnist_location() or user_data_dir())'
}

if where="$(fmnist 2>/dev/null)"; then
  echo "[setup] Fashion-MNIST: $where"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
if command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; }; then
  echo "[setup] installing Debian's dataset-fashion-mnist"
  $SUDO apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null || true
  if where="$(fmnist 2>/dev/null)"; then
    echo "[setup] Fashion-MNIST: $where"
    exit 0
  fi
fi
echo "[setup] Fashion-MNIST: trying torchvision's download into the user data directory"
# The shared, locked and atomic fetch (mosaic_flwr/data/fetch.py); its error says how to provide it.
"$VENV/bin/python" -m mosaic_flwr.data.fetch fmnist
where="$(fmnist)"
echo "[setup] Fashion-MNIST: $where"
