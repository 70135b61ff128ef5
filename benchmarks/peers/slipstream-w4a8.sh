#!/usr/bin/env bash
# slipstream with --quantization w4a8 (int8 activations, as llama.cpp computes), served like the peers.
case "${1:-}" in
  serve)
    shift
    port=${1:-8000}
    shift || true
    exec "$(dirname "$0")/slipstream.sh" serve "$port" --quantization w4a8 "$@" ;;
  *) exec "$(dirname "$0")/slipstream.sh" "$@" ;;
esac
