#!/usr/bin/env bash
# slipstream with --quantization w4a8 (int8 activations, as llama.cpp computes), served like the peers.
SLIPSTREAM_ARGS="--quantization w4a8" exec "$(dirname "$0")/slipstream.sh" "$@"
