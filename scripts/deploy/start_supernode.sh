#!/usr/bin/env bash
# Start a SuperNode that authenticates with its private key, trusts only the given root
# certificate and trains on its own data, in the foreground (Ctrl-C or SIGTERM stops it).
#
# usage: scripts/deploy/start_supernode.sh --superlink HOST:PORT --root-cert CA_CRT --key PRIVATE_KEY \
#       (--data-file FILE | --partition-id N --num-partitions M [--data-dir DIR]) \
#       [--port PORT] [--home DIR] [--node-config "key=value ..."]
#
#   --superlink HOST:PORT  the SuperLink (HOST must be a name/IP in its certificate)
#   --root-cert CA_CRT     the CA certificate that signed the SuperLink's (ca.crt)
#   --key PRIVATE_KEY      this node's private key (make_node_keys.sh); its .pub must be
#                          registered on the SuperLink (flwr_deploy.py register)
#   --data-file FILE       this node's partition file (make_partitions.py); partition-id and
#                          num-partitions are read from it
#   --partition-id N --num-partitions M [--data-dir DIR]
#                          instead: the project's partition N of M of a local copy of the data
#                          set under DIR (default: the run config's data-dir)
#   --port PORT            local port of this SuperNode's Runtime API (127.0.0.1 only), one per
#                          SuperNode on a machine (default 9094)
#   --home DIR             FLWR_HOME of this SuperNode (default <repo>/.flwr/supernode-PORT)
#   --node-config "..."    more node-config entries, e.g. "model='cnn_small' capacity=0.5";
#                          ledger-dir='DIR': the privacy ledger under DP (default FLWR_HOME/privacy-ledger)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

partition_node_config() {  # node config from --partition-id/--num-partitions[/--data-dir]
  [[ -n "$PART_ID" && -n "$NUM_PARTS" ]] || die 2 "give --data-file FILE, or --partition-id N and --num-partitions M"
  [[ "$PART_ID" =~ ^[0-9]+$ && "$NUM_PARTS" =~ ^[0-9]+$ ]] && (( PART_ID < NUM_PARTS )) \
    || die 2 "--partition-id $PART_ID must be an integer in [0, --num-partitions $NUM_PARTS)"
  local config="partition-id=$PART_ID num-partitions=$NUM_PARTS"
  if [[ -n "$DATA_DIR" ]]; then
    [[ -d "$DATA_DIR" ]] || die 1 "--data-dir $DATA_DIR: directory not found"
    [[ "$DATA_DIR" != *"'"* ]] || die 2 "--data-dir: a path with a single quote is not supported"
    config+=" data-dir='$(cd "$DATA_DIR" && pwd)'"
  fi
  echo "$config"
}

file_node_config() {  # node config from --data-file (its ids are read from the file)
  [[ -z "$PART_ID$NUM_PARTS$DATA_DIR" ]] || die 2 "give --data-file, or --partition-id/--num-partitions/--data-dir, not both"
  need_file --data-file "$DATA_FILE" "this node's partition file, from scripts/deploy/make_partitions.py"
  "$BIN/python" "$ROOT/scripts/deploy/make_partitions.py" --node-config-of "$DATA_FILE" \
    || die 1 "--data-file $DATA_FILE: see the error above"
}

help_or_nothing 1 "$@"
SUPERLINK="" ROOT_CERT="" KEY="" DATA_FILE="" PART_ID="" NUM_PARTS="" DATA_DIR="" PORT="9094" HOME_DIR="" EXTRA=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --superlink) need_value "$@"; SUPERLINK="$2"; shift 2 ;;
    --root-cert) need_value "$@"; ROOT_CERT="$2"; shift 2 ;;
    --key) need_value "$@"; KEY="$2"; shift 2 ;;
    --data-file) need_value "$@"; DATA_FILE="$2"; shift 2 ;;
    --partition-id) need_value "$@"; PART_ID="$2"; shift 2 ;;
    --num-partitions) need_value "$@"; NUM_PARTS="$2"; shift 2 ;;
    --data-dir) need_value "$@"; DATA_DIR="$2"; shift 2 ;;
    --port) need_value "$@"; PORT="$2"; shift 2 ;;
    --home) need_value "$@"; HOME_DIR="$2"; shift 2 ;;
    --node-config) need_value "$@"; EXTRA="$2"; shift 2 ;;
    -h|--help) usage ;;
    *) die 2 "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -n "$SUPERLINK" ]] || die 2 "--superlink HOST:PORT is required (see --help)"
[[ -n "$ROOT_CERT" ]] || die 2 "--root-cert CA_CRT is required: the SuperNode trusts only this CA (see --help)"
[[ -n "$KEY" ]] || die 2 "--key PRIVATE_KEY is required: the SuperLink admits registered keys only (see --help)"
[[ "$SUPERLINK" =~ ^[^:/[:space:]]+:[0-9]+$ || "$SUPERLINK" =~ ^\[[0-9A-Fa-f:]+\]:[0-9]+$ ]] \
  || die 2 "--superlink '$SUPERLINK' is not HOST:PORT"
need_port --superlink "${SUPERLINK##*:}"
need_port --port "$PORT"
need_file --root-cert "$ROOT_CERT" "the SuperLink's ca.crt, from scripts/deploy/make_certs.sh"
need_file --key "$KEY" "this node's private key, from scripts/deploy/make_node_keys.sh"
grep -q "PRIVATE KEY" "$KEY" || die 2 "--key $KEY is not a private key (give NAME, not NAME.pub)"
need_bin flower-supernode
need_free_port --port 127.0.0.1 "$PORT"
if [[ -n "$DATA_FILE" ]]; then
  NODE_CONFIG="$(file_node_config)"
else
  NODE_CONFIG="$(partition_node_config)"
fi
[[ -z "$EXTRA" ]] || NODE_CONFIG+=" $EXTRA"

flower_env "${HOME_DIR:-$ROOT/.flwr/supernode-$PORT}"
# Under DP the client's privacy ledger lives here, out of the server's reach (docs/privacy.md, the privacy ledger)
[[ "$NODE_CONFIG" == *ledger-dir=* ]] || NODE_CONFIG+=" ledger-dir='$FLWR_HOME/privacy-ledger'"
echo "[start_supernode] SuperLink $SUPERLINK, key $(abspath "$KEY"), node-config: $NODE_CONFIG, pid $$"
exec "$BIN/flower-supernode" --superlink "$SUPERLINK" \
  --root-certificates "$(abspath "$ROOT_CERT")" --auth-supernode-private-key "$(abspath "$KEY")" \
  --node-config "$NODE_CONFIG" --host 127.0.0.1 --port "$PORT"
