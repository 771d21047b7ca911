# Shared by the scripts in scripts/deploy (sourced, not run): where things are, argument
# checks with one clear error line each, and the environment Flower's processes run in.
#
# A script that sources this file documents its usage in its header comment (the comment
# lines after the shebang); `usage` prints them.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="${MOSAIC_VENV:-$ROOT/.venv}/bin"
SCRIPT="$(basename "$0")"

usage() {  # the calling script's header comment, then exit 2
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
}

die() {  # die CODE MESSAGE: one error line on stderr, exit CODE (2 bad usage, 1 anything else)
  echo "$SCRIPT: error: $2" >&2
  exit "$1"
}

help_or_nothing() {  # help_or_nothing MIN_ARGS "$@": usage on -h/--help or too few arguments
  local min="$1"; shift
  [[ $# -ge "$min" ]] || usage
  case "${1:-}" in -h|--help) usage ;; esac
}

need_value() {  # need_value OPTION "$@" (the option's remaining arguments)
  [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die 2 "$1 needs a value (see --help)"
}

need_file() {  # need_file OPTION PATH HINT
  [[ -f "$2" ]] || die 1 "$1 $2: file not found${3:+ ($3)}"
  [[ -r "$2" ]] || die 1 "$1 $2: not readable"
  [[ "$2" != *"'"* ]] || die 2 "$1 $2: a path with a single quote is not supported"
}

need_port() {  # need_port OPTION VALUE
  [[ "$2" =~ ^[0-9]+$ ]] && (( $2 >= 1 && $2 <= 65535 )) || die 2 "$1 '$2' is not a port number (1-65535)"
}

need_free_port() {  # need_free_port OPTION HOST PORT: nothing else may listen there
  local err
  err="$("$BIN/python" - "$2" "$3" 2>&1 <<'PYEOF'
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
with socket.socket(family) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as exc:
        sys.exit(exc.strerror or str(exc))
PYEOF
  )" || die 1 "$1 $3: cannot listen on $2:$3 (${err:-in use}); is another SuperLink/SuperNode running there? Choose another port"
}

need_bin() {  # need_bin NAME: a program of the project's virtual environment
  [[ -x "$BIN/$1" ]] || die 1 "$BIN/$1 not found (run scripts/setup.sh, or point MOSAIC_VENV at the venv)"
}

abspath() {  # abspath PATH (its directory must exist)
  echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
}

flower_env() {  # flower_env FLWR_HOME: the environment of a SuperLink or SuperNode
  mkdir -p "$1"
  export FLWR_HOME="$(cd "$1" && pwd)" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1 \
    PATH="$BIN:$PATH"
}
