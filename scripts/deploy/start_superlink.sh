#!/usr/bin/env bash
# Start a SuperLink with TLS and SuperNode authentication, in the foreground (Ctrl-C or
# SIGTERM stops it). Runtime dependency installation, telemetry and the update check are off.
#
# usage: scripts/deploy/start_superlink.sh --certs DIR [--host ADDR] [--port PORT] [--home DIR] [--database FILE]
#
#   --certs DIR      holds ca.crt, server.crt, server.key (scripts/deploy/make_certs.sh)
#   --host ADDR      address to listen on (default 127.0.0.1: this machine only;
#                    0.0.0.0 to accept SuperNodes and submitters from other machines)
#   --port PORT      the one port of the Fleet, Control and Runtime APIs (default 9093)
#   --home DIR       FLWR_HOME of the SuperLink: installed apps (default <repo>/.flwr/superlink-PORT)
#   --database FILE  SQLite file for the SuperLink's state, so registered SuperNodes survive a
#                    restart (default: in memory; register the SuperNodes again after a restart)
#
# Then allow each SuperNode's public key: scripts/deploy/flwr_deploy.py register ...
# The ServerApp runs here, in the repository root: a relative output-dir is relative to it,
# and the server's test set must be on this machine.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

help_or_nothing 1 "$@"
CERTS="" HOST="127.0.0.1" PORT="9093" HOME_DIR="" DATABASE=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --certs) need_value "$@"; CERTS="$2"; shift 2 ;;
    --host) need_value "$@"; HOST="$2"; shift 2 ;;
    --port) need_value "$@"; PORT="$2"; shift 2 ;;
    --home) need_value "$@"; HOME_DIR="$2"; shift 2 ;;
    --database) need_value "$@"; DATABASE="$2"; shift 2 ;;
    -h|--help) usage ;;
    *) die 2 "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -n "$CERTS" ]] || die 2 "--certs DIR is required (see --help)"
need_port --port "$PORT"
for f in ca.crt server.crt server.key; do
  need_file --certs "$CERTS/$f" "make it with scripts/deploy/make_certs.sh"
done
need_bin flower-superlink
need_free_port --port "$HOST" "$PORT"

CERTS="$(cd "$CERTS" && pwd)"
db_args=()
if [[ -n "$DATABASE" ]]; then
  mkdir -p "$(dirname "$DATABASE")"
  db_args=(--database "$(abspath "$DATABASE")")
fi
flower_env "${HOME_DIR:-$ROOT/.flwr/superlink-$PORT}"
cd "$ROOT"
echo "[start_superlink] https://$HOST:$PORT (TLS, SuperNode authentication on), FLWR_HOME=$FLWR_HOME, pid $$"
exec "$BIN/flower-superlink" \
  --ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.crt" --ssl-keyfile "$CERTS/server.key" \
  --enable-supernode-auth --disable-runtime-dependency-installation \
  --host "$HOST" --port "$PORT" "${db_args[@]}"
