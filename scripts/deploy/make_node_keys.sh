#!/usr/bin/env bash
# Make SuperNode authentication key pairs (ECDSA P-384, OpenSSH format, as Flower 1.42 wants).
#
# usage: scripts/deploy/make_node_keys.sh OUT_DIR NAME [NAME ...]
#   e.g. scripts/deploy/make_node_keys.sh keys client-0 client-1
#
# For each NAME writes OUT_DIR/NAME, the private key (secret: it stays on that SuperNode's
# machine, `start_supernode.sh --key OUT_DIR/NAME`), and OUT_DIR/NAME.pub, the public key
# (give it to the SuperLink operator, who allows it with `flwr_deploy.py register ... NAME.pub`).
# Best practice: each data owner runs this on their own machine and sends only NAME.pub.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

help_or_nothing 2 "$@"

keygen() {  # keygen PRIVATE_PATH COMMENT
  if command -v ssh-keygen >/dev/null; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "$2" -f "$1"
    return
  fi
  need_bin python  # no ssh-keygen: the same key format with `cryptography` (a flwr dependency)
  "$BIN/python" - "$1" "$2" <<'PYEOF'
import os, sys
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP384R1())
path, comment = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
with os.fdopen(fd, "wb") as f:
    f.write(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption()))
with open(path + ".pub", "wb") as f:
    f.write(key.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH) + f" {comment}\n".encode())
PYEOF
}

OUT="$1"; shift
for name in "$@"; do  # check every name before writing anything
  [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || die 2 "NAME '$name' may hold letters, digits, '.', '_', '-' only"
  [[ ! -e "$OUT/$name" && ! -e "$OUT/$name.pub" ]] || die 1 "$OUT/$name or $OUT/$name.pub exists; keys are not overwritten"
done
mkdir -p "$OUT"
for name in "$@"; do
  (umask 077; keygen "$OUT/$name" "$name")
  chmod 600 "$OUT/$name"
  chmod 644 "$OUT/$name.pub"
  echo "[make_node_keys] $name: private $OUT/$name (secret: keep on the SuperNode), public $OUT/$name.pub (register on the SuperLink)"
done
