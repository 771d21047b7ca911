#!/usr/bin/env bash
# Start a SuperLink with TLS and SuperNode authentication behind an operator-only proxy, in the
# foreground (Ctrl-C or SIGTERM stops both). Runtime dependency installation, telemetry and the
# update check are off.
#
# usage: scripts/deploy/start_superlink.sh --certs DIR [--host ADDR] [--port PORT] [--home DIR] [--database FILE]
#            [--internal-port PORT] [--max-body SIZE] [--no-proxy]
#
#   --certs DIR      holds ca.crt, server.crt, server.key (scripts/deploy/make_certs.sh)
#   --host ADDR      address to listen on (default 127.0.0.1: this machine only;
#                    0.0.0.0 to accept SuperNodes and submitters from other machines)
#   --port PORT      the one port of the Fleet and Control APIs (default 9093)
#   --home DIR       FLWR_HOME of the SuperLink: installed apps (default <repo>/.flwr/superlink-PORT)
#   --database FILE  SQLite file for the SuperLink's state, so registered SuperNodes survive a
#                    restart (default: in memory; register the SuperNodes again after a restart)
#   --internal-port PORT  the SuperLink's own port, on 127.0.0.1 only, behind the proxy
#                    (default PORT + 10000)
#   --max-body SIZE  the largest request the proxy passes, nginx units (default 512m, Flower's
#                    own message limit)
#   --no-proxy       serve Flower's port directly on HOST:PORT, without the proxy: then ANYONE
#                    who reaches the port can register SuperNodes and run code on every
#                    SuperNode (Flower 1.42's open-source Control API has no authentication);
#                    only for a SuperLink on 127.0.0.1 of a machine nobody else uses
#
# The proxy (nginx, from Debian: apt-get install nginx) terminates TLS on HOST:PORT with
# server.crt and passes
#   /v1/fleet/*    (SuperNodes; Flower admits only registered keys) and /health to anyone;
#   /v1/control/*  (register SuperNodes, submit/list/stop runs) only to a client certificate
#                  signed by ca.crt for client authentication (operator.crt from make_certs.sh;
#                  flwr_deploy.py --operator-cert/--operator-key presents it);
# and refuses everything else (the runtime API is for this machine's SuperExec only) with 403.
# Each request is one line of FLWR_HOME/proxy/access.log ([proxy] ... STATUS client-cert=...).
# Then allow each SuperNode's public key: scripts/deploy/flwr_deploy.py register ...
# The ServerApp runs here, in the repository root: a relative output-dir is relative to it,
# and the server's test set must be on this machine.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

help_or_nothing 1 "$@"
CERTS="" HOST="127.0.0.1" PORT="9093" HOME_DIR="" DATABASE="" INTERNAL="" MAX_BODY="512m" PROXY=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --certs) need_value "$@"; CERTS="$2"; shift 2 ;;
    --host) need_value "$@"; HOST="$2"; shift 2 ;;
    --port) need_value "$@"; PORT="$2"; shift 2 ;;
    --home) need_value "$@"; HOME_DIR="$2"; shift 2 ;;
    --database) need_value "$@"; DATABASE="$2"; shift 2 ;;
    --internal-port) need_value "$@"; INTERNAL="$2"; shift 2 ;;
    --max-body) need_value "$@"; MAX_BODY="$2"; shift 2 ;;
    --no-proxy) PROXY=0; shift ;;
    -h|--help) usage ;;
    *) die 2 "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -n "$CERTS" ]] || die 2 "--certs DIR is required (see --help)"
need_port --port "$PORT"
[[ -z "$INTERNAL" ]] || need_port --internal-port "$INTERNAL"
for f in ca.crt server.crt server.key; do
  need_file --certs "$CERTS/$f" "make it with scripts/deploy/make_certs.sh"
done
need_bin flower-superlink
[[ "$MAX_BODY" =~ ^[1-9][0-9]*[kKmMgG]?$ ]] || die 2 "--max-body '$MAX_BODY' is not a size (e.g. 512m)"
need_free_port --port "$HOST" "$PORT"
CERTS="$(cd "$CERTS" && pwd)"
db_args=()
if [[ -n "$DATABASE" ]]; then
  mkdir -p "$(dirname "$DATABASE")"
  db_args=(--database "$(abspath "$DATABASE")")
fi
flower_env "${HOME_DIR:-$ROOT/.flwr/superlink-$PORT}"
cd "$ROOT"
# Flower's SuperLink, TLS and SuperNode authentication on (then --host and --port)
superlink=("$BIN/flower-superlink"
  --ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.crt" --ssl-keyfile "$CERTS/server.key"
  --enable-supernode-auth --disable-runtime-dependency-installation "${db_args[@]}")

if (( ! PROXY )); then
  echo "[start_superlink] WARNING: --no-proxy: anyone who reaches $HOST:$PORT can register SuperNodes and submit runs"
  echo "[start_superlink] https://$HOST:$PORT (TLS, SuperNode authentication on), FLWR_HOME=$FLWR_HOME, pid $$"
  exec "${superlink[@]}" --host "$HOST" --port "$PORT"
fi

# Behind the proxy: the SuperLink on 127.0.0.1 only, reached through nginx (and by its own
# SuperExec, which connects to the SuperLink's --host), its certificate verified for localhost.
NGINX="$(command -v nginx || true)"
[[ -n "$NGINX" ]] || NGINX=/usr/sbin/nginx
[[ -x "$NGINX" ]] || die 1 "nginx not found: the proxy that keeps the Control API for the operator needs it (apt-get install nginx, or scripts/setup.sh --deploy)"
INTERNAL="${INTERNAL:-$((PORT + 10000))}"
need_port --internal-port "$INTERNAL"
[[ "$INTERNAL" != "$PORT" ]] || die 2 "--internal-port must differ from --port"
need_free_port --internal-port 127.0.0.1 "$INTERNAL"
openssl x509 -in "$CERTS/server.crt" -noout -checkhost localhost -checkip 127.0.0.1 2>/dev/null \
  | grep -q "^IP 127.0.0.1 does match" \
  && openssl x509 -in "$CERTS/server.crt" -noout -checkhost localhost | grep -q "does match" \
  || die 1 "--certs $CERTS/server.crt is not made for localhost and 127.0.0.1, where the proxy and the SuperExec reach the SuperLink (make the certificates without --no-loopback)"

PROXY_DIR="$FLWR_HOME/proxy"
mkdir -p "$PROXY_DIR/tmp"
LISTEN="$HOST:$PORT"
[[ "$HOST" != *:* ]] || LISTEN="[$HOST]:$PORT"
UPSTREAM="https://127.0.0.1:$INTERNAL"
WORKER_USER=""
(( EUID != 0 )) || WORKER_USER="user nobody nogroup;"
cat >"$PROXY_DIR/nginx.conf" <<NGINX
# written by scripts/deploy/start_superlink.sh at each start: edit the script, not this file
$WORKER_USER
worker_processes 1;
pid $PROXY_DIR/nginx.pid;
error_log stderr notice;
events { worker_connections 1024; }
http {
  log_format mosaic '[proxy] \$time_iso8601 \$remote_addr "\$request_method \$uri" \$status '
                    'client-cert=\$ssl_client_verify "\$ssl_client_s_dn" \$request_time s';
  access_log $PROXY_DIR/access.log mosaic;
  server_tokens off;
  client_body_temp_path $PROXY_DIR/tmp/body;
  proxy_temp_path $PROXY_DIR/tmp/proxy;
  fastcgi_temp_path $PROXY_DIR/tmp/fastcgi;
  uwsgi_temp_path $PROXY_DIR/tmp/uwsgi;
  scgi_temp_path $PROXY_DIR/tmp/scgi;
  server {
    listen $LISTEN ssl;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate $CERTS/server.crt;
    ssl_certificate_key $CERTS/server.key;
    # the operator: a client certificate signed by the deployment's CA for client authentication
    ssl_client_certificate $CERTS/ca.crt;
    ssl_verify_client optional;
    ssl_verify_depth 1;
    client_max_body_size $MAX_BODY;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_buffering off;
    proxy_request_buffering off;
    proxy_read_timeout 1h;
    proxy_send_timeout 1h;
    proxy_ssl_trusted_certificate $CERTS/ca.crt;
    proxy_ssl_verify on;
    proxy_ssl_name localhost;
    location /v1/fleet/ { proxy_pass $UPSTREAM; }
    location = /health { proxy_pass $UPSTREAM; }
    location /v1/control/ {
      if (\$ssl_client_verify != SUCCESS) { return 403; }
      proxy_pass $UPSTREAM;
    }
    location / { return 403; }
  }
}
NGINX
nginx_cmd=("$NGINX" -e stderr -p "$PROXY_DIR" -c "$PROXY_DIR/nginx.conf")
check="$("${nginx_cmd[@]}" -t 2>&1)" || { echo "$check" >&2; die 1 "nginx refused the proxy's configuration $PROXY_DIR/nginx.conf (above)"; }

pids=()
stop() { kill -TERM "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; }
trap 'stop; exit 143' TERM
trap 'stop; exit 130' INT
"${superlink[@]}" --host 127.0.0.1 --port "$INTERNAL" & pids+=($!)
"${nginx_cmd[@]}" -g "daemon off;" & pids+=($!)
echo "[start_superlink] https://$HOST:$PORT (nginx: Control API for the operator's certificate only) -> SuperLink https://127.0.0.1:$INTERNAL (TLS, SuperNode authentication on), FLWR_HOME=$FLWR_HOME, pid $$; requests logged to $PROXY_DIR/access.log"
code=0
wait -n "${pids[@]}" || code=$?
echo "[start_superlink] $( ((code)) && echo "a process exited with code $code" || echo "a process exited" ); stopping the other"
stop
exit "$code"
