#!/usr/bin/env bash
# slipstream's fastest mode: --quantization w4a8 with the KV cache in int8 (a scale per token and head).
SLIPSTREAM_ARGS="--quantization w4a8 --kv-cache-dtype int8" exec "$(dirname "$0")/slipstream.sh" "$@"
