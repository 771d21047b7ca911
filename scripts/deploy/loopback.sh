#!/usr/bin/env bash
# The whole deployment on this machine, over 127.0.0.1: certificates, node keys and partition
# files (made once under DIR, reused), a SuperLink with TLS and SuperNode authentication, N
# authorised SuperNodes, one submitted run; then every process it started is stopped by PID
# (also on failure or Ctrl-C). Exit code: the run's (0 completed, 1 failed, 2 not started).
#
# usage: scripts/deploy/loopback.sh [--dir DIR] [--nodes N] [--run-config "key=value ..."]
#
#   --dir DIR            certificates, keys, partitions, logs, Flower homes (default <repo>/deploy/loopback)
#   --nodes N            SuperNodes, one partition each (default 2)
#   --run-config "..."   run-config overrides (TOML values), also used to make the partitions;
#                        repeatable
#
# Across machines the same steps run by hand, with only the address changing (docs/deployment.md).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DIR="$ROOT/deploy/loopback" NODES=2 RUN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) need_value "$@"; DIR="$2"; shift 2 ;;
    --nodes) need_value "$@"; NODES="$2"; shift 2 ;;
    --run-config) need_value "$@"; RUN_ARGS+=(--run-config "$2"); shift 2 ;;
    -h|--help) usage ;;
    *) die 2 "unknown argument '$1' (see --help)" ;;
  esac
done
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die 2 "--nodes '$NODES' is not a positive number"
need_bin python
mkdir -p "$DIR/logs"
DIR="$(cd "$DIR" && pwd)"
PIDS=()

any_alive() { local pid; for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done; return 1; }

descendants() {  # descendants PID...: PIDs of their children, grandchildren, ...
  local pid child
  for pid in "$@"; do
    for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do echo "$child"; descendants "$child"; done
  done
}

stop_all() {  # by PID: the SuperNodes first, the SuperLink last, then what they started
  local i all
  mapfile -t all < <(descendants "${PIDS[@]}")  # SuperExec, ServerApp, ClientApps (own sessions)
  for (( i = ${#PIDS[@]} - 1; i >= 0; i-- )); do kill -TERM "${PIDS[i]}" 2>/dev/null || true; done
  all=("${PIDS[@]}" "${all[@]}")
  for (( i = 0; i < 75; i++ )); do any_alive "${all[@]}" || break; sleep 0.2; done
  for i in "${all[@]}"; do kill -KILL "$i" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop_all EXIT
trap 'exit 130' INT TERM

free_port() { "$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

prepare() {  # certificates and keys once; partitions for this run config
  [[ -f "$DIR/certs/ca.crt" ]] || bash "$ROOT/scripts/deploy/make_certs.sh" "$DIR/certs" 127.0.0.1
  [[ -f "$DIR/certs/operator.crt" ]] \
    || die 1 "$DIR/certs was made before operator certificates existed: remove it (it is made again)"
  local i names=()
  for (( i = 0; i < NODES; i++ )); do [[ -f "$DIR/keys/client-$i" ]] || names+=("client-$i"); done
  (( ${#names[@]} == 0 )) || bash "$ROOT/scripts/deploy/make_node_keys.sh" "$DIR/keys" "${names[@]}"
  "$BIN/python" "$ROOT/scripts/deploy/make_partitions.py" --out "$DIR/parts" --num-partitions "$NODES" \
    "${RUN_ARGS[@]}"
}

deploy_py() {  # as the operator
  "$BIN/python" "$ROOT/scripts/deploy/flwr_deploy.py" "$@" --superlink "$ADDRESS" --root-cert "$DIR/certs/ca.crt" \
    --operator-cert "$DIR/certs/operator.crt" --operator-key "$DIR/certs/operator.key"
}

prepare
PORT="$(free_port)"
ADDRESS="127.0.0.1:$PORT"
proxy=(--internal-port "$(free_port)")
if ! command -v nginx >/dev/null && [[ ! -x /usr/sbin/nginx ]]; then
  echo "[loopback] nginx is not installed (apt-get install nginx): the SuperLink runs without its operator-only proxy, on 127.0.0.1"
  proxy=(--no-proxy)
fi
bash "$ROOT/scripts/deploy/start_superlink.sh" --certs "$DIR/certs" --port "$PORT" "${proxy[@]}" \
  --home "$DIR/home-superlink" >"$DIR/logs/superlink.log" 2>&1 &
PIDS+=($!)
deploy_py nodes --wait 90 >/dev/null || die 2 "the SuperLink did not come up; see $DIR/logs/superlink.log"
keys=()
for (( i = 0; i < NODES; i++ )); do keys+=("$DIR/keys/client-$i.pub"); done
deploy_py register "${keys[@]}"
for (( i = 0; i < NODES; i++ )); do
  bash "$ROOT/scripts/deploy/start_supernode.sh" --superlink "$ADDRESS" --root-cert "$DIR/certs/ca.crt" \
    --key "$DIR/keys/client-$i" --data-file "$DIR/parts/client-$i.pt" --port "$(free_port)" \
    --home "$DIR/home-client-$i" >"$DIR/logs/client-$i.log" 2>&1 &
  PIDS+=($!)
done
echo "[loopback] SuperLink $ADDRESS (pid ${PIDS[0]}), SuperNodes pids ${PIDS[*]:1}; logs in $DIR/logs"
deploy_py nodes --online "$NODES" --wait 90
start=$SECONDS
code=0
deploy_py submit "${RUN_ARGS[@]}" || code=$?
echo "[loopback] submit to end of run: $(( SECONDS - start )) s, exit $code"
exit "$code"
