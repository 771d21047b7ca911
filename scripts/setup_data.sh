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

fmnist() {  # fmnist [download]: print the directory the app reads Fashion-MNIST from
  "$VENV/bin/python" -c '
import sys
from mosaic_flwr.data.datasets import DatasetNotFoundError, fmnist_location, load_dataset, user_data_dir
try:
    load_dataset("fmnist", None, download=sys.argv[1:] == ["download"])
except DatasetNotFoundError as exc:
    sys.exit(str(exc) if sys.argv[1:] else 1)
print(fmnist_location() or user_data_dir())' "$@"
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
user_dir="$("$VENV/bin/python" -c 'from mosaic_flwr.data.datasets import user_data_dir; print(user_data_dir())')"
echo "[setup] trying torchvision's download of Fashion-MNIST into $user_dir"
if where="$(fmnist download)"; then
  echo "[setup] Fashion-MNIST: $where"
  exit 0
fi
echo "[setup] ERROR: Fashion-MNIST is not available: install Debian's dataset-fashion-mnist" >&2
echo "        (files in /usr/share/datasets/fashion-mnist) or put the four IDX files in $user_dir/fashion-mnist" >&2
echo "        (or set MOSAIC_FLWR_DATA to a directory that holds them in fashion-mnist/)" >&2
exit 1
