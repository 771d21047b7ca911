#!/usr/bin/env bash
# Make a self-signed CA, a TLS server certificate for a SuperLink and an operator's client
# certificate, with openssl.
#
# usage: scripts/deploy/make_certs.sh [--no-loopback] OUT_DIR NAME_OR_IP [NAME_OR_IP ...]
#   e.g. scripts/deploy/make_certs.sh certs 127.0.0.1 superlink.example.org 10.0.0.5
#
# Writes OUT_DIR/ca.crt (public: give it to every SuperNode and to whoever submits runs),
# OUT_DIR/ca.key (the CA's private key: keep it offline), OUT_DIR/server.crt and
# OUT_DIR/server.key (the SuperLink's; server.key is secret and stays on the SuperLink host),
# OUT_DIR/operator.crt and OUT_DIR/operator.key (the operator's client certificate: whoever holds
# operator.key may register SuperNodes and submit, list and stop runs through the SuperLink's
# proxy; keep it with the operator, never on a SuperNode).
# The server certificate's subjectAltName holds every NAME_OR_IP given (IP addresses become
# IP: entries, host names DNS:) plus localhost and 127.0.0.1 unless --no-loopback is given.
# SuperNodes and the CLI must connect with one of these names, and so does the SuperLink's own
# SuperExec (the ServerApp's launcher): it connects to the SuperLink's --host, or to 127.0.0.1
# when that is 0.0.0.0, and the proxy of start_superlink.sh reaches it on 127.0.0.1 as localhost:
# --no-loopback is only for start_superlink.sh --no-proxy --host set to a name here.
# For testing and small deployments; use your organisation's CA otherwise.
# Env: CERT_DAYS (validity, default 365), CERT_KEY_BITS (RSA bits, default 3072).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

LOOPBACK=(localhost 127.0.0.1)
case "${1:-}" in --no-loopback) LOOPBACK=(); shift ;; esac
help_or_nothing 2 "$@"
command -v openssl >/dev/null || die 1 "openssl not found (apt-get install openssl)"
OUT="$1"; shift
DAYS="${CERT_DAYS:-365}"
BITS="${CERT_KEY_BITS:-3072}"
[[ "$DAYS" =~ ^[1-9][0-9]*$ ]] || die 2 "CERT_DAYS '$DAYS' is not a positive number of days"
[[ "$BITS" =~ ^(2048|3072|4096)$ ]] || die 2 "CERT_KEY_BITS '$BITS': use 2048, 3072 or 4096"

subject_alt_names() {  # NAME_OR_IP ... -> "IP:1.2.3.4,DNS:host,..." (plus LOOPBACK's names)
  local -A seen=()
  local sans=() name
  for name in "$@" "${LOOPBACK[@]}"; do
    [[ -n "$name" ]] || die 2 "empty NAME_OR_IP"
    [[ -z "${seen[$name]:-}" ]] || continue
    seen[$name]=1
    if [[ "$name" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || "$name" == *:* ]]; then
      sans+=("IP:$name")
    elif [[ "$name" =~ ^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]]; then
      sans+=("DNS:$name")
    else
      die 2 "'$name' is neither an IP address nor a host name"
    fi
  done
  (IFS=,; echo "${sans[*]}")
}

quietly() {  # run openssl quietly; show its output only when it fails
  local log
  log="$("$@" 2>&1)" || { echo "$log" >&2; die 1 "openssl failed: $*"; }
}

SAN="$(subject_alt_names "$@")"
mkdir -p "$OUT"
for f in ca.key ca.crt server.key server.crt operator.key operator.crt; do
  [[ ! -e "$OUT/$f" ]] || die 1 "$OUT/$f exists; certificates are not overwritten (remove them or choose another OUT_DIR)"
done
umask 077
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
quietly openssl req -x509 -newkey "rsa:$BITS" -sha256 -days "$DAYS" -nodes \
  -keyout "$OUT/ca.key" -out "$OUT/ca.crt" -subj "/CN=mosaic-flwr SuperLink CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
quietly openssl req -newkey "rsa:$BITS" -sha256 -nodes -keyout "$OUT/server.key" \
  -out "$tmp/server.csr" -subj "/CN=$1"
cat >"$tmp/ext.cnf" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$SAN
EXT
quietly openssl x509 -req -in "$tmp/server.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" \
  -CAcreateserial -CAserial "$tmp/ca.srl" -out "$OUT/server.crt" -days "$DAYS" -sha256 \
  -extfile "$tmp/ext.cnf"
# the operator's client certificate: TLS client authentication only (extendedKeyUsage
# clientAuth), so it can never serve as a SuperLink's certificate, nor the server's as an operator's
quietly openssl req -newkey "rsa:$BITS" -sha256 -nodes -keyout "$OUT/operator.key" \
  -out "$tmp/operator.csr" -subj "/CN=mosaic-flwr operator"
cat >"$tmp/operator.cnf" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
EXT
quietly openssl x509 -req -in "$tmp/operator.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" \
  -CAserial "$tmp/ca.srl" -out "$OUT/operator.crt" -days "$DAYS" -sha256 -extfile "$tmp/operator.cnf"
chmod 600 "$OUT/ca.key" "$OUT/server.key" "$OUT/operator.key"
chmod 644 "$OUT/ca.crt" "$OUT/server.crt" "$OUT/operator.crt"
quietly openssl verify -CAfile "$OUT/ca.crt" -purpose sslserver "$OUT/server.crt"
quietly openssl verify -CAfile "$OUT/ca.crt" -purpose sslclient "$OUT/operator.crt"
echo "[make_certs] CA: $OUT/ca.crt (public: give to SuperNodes and submitters), $OUT/ca.key (secret)"
echo "[make_certs] SuperLink: $OUT/server.crt, $OUT/server.key (secret) for $SAN"
echo "[make_certs] operator: $OUT/operator.crt, $OUT/operator.key (secret: the Control API's key)"
