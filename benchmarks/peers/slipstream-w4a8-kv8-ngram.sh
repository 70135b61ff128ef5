#!/usr/bin/env bash
# slipstream's fastest mode with n-gram speculation: requests guess their next tokens from their own context and
# check the guesses in their decode step (greedy: the same tokens; fewer steps while at most 2 sequences run).
SLIPSTREAM_ARGS='--quantization w4a8 --kv-cache-dtype int8 --speculative-config {"method":"ngram"}' \
  exec "$(dirname "$0")/slipstream.sh" "$@"
