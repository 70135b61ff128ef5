#!/usr/bin/env bash
# slipstream itself, from this checkout, served the way the peers are ($SLIPSTREAM_ARGS: the flags of a mode,
# as the slipstream-*.sh wrappers set them).
source "$(dirname "$0")/common.sh"

install() {
  make -C "$REPO" install
}

serve() {
  local port=${1:-8000}
  shift || true
  exec "$REPO/.venv/bin/python" -m slipstream.entrypoints.openai.api_server --host 127.0.0.1 --port "$port" \
    ${GGUF:+--model "$GGUF" --served-model-name "$MODEL_NAME"} ${SLIPSTREAM_ARGS:-} "$@"
}

dispatch "$@"
