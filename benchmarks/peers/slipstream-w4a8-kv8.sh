#!/usr/bin/env bash
# slipstream's fast mode: --quantization w4a8 with the KV cache in int8 (a scale per token and head); like every
# server started without --speculative-config, it guesses (n-gram speculation) while one sequence runs.
SLIPSTREAM_ARGS="--quantization w4a8 --kv-cache-dtype int8" exec "$(dirname "$0")/slipstream.sh" "$@"
