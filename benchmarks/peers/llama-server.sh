#!/usr/bin/env bash
# llama.cpp's C++ llama-server, built (cmake, ~8 min on 2 cores) from the llama.cpp tree vendored in the
# llama-cpp-python sdist on PyPI; serves the same Q4_1 GGUF with 2 threads and 32 slots.
#
# The build is for the CPU it is on: first native (-DGGML_NATIVE=ON), whose server is then tried once on one
# request; where it crashes (as its AMX Q4_1 kernel does with SIGILL on some Xeons) it is rebuilt without native
# tuning, with each AVX-512 / VNNI / BF16 option this CPU's flags have. $DIR/variant says which build it is.
# `k-quant-model OUT.gguf` writes a Q4_K_M file whose matmuls are all K-quants (k_quant_model below), for compare.py.
source "$(dirname "$0")/common.sh"

VERSION=0.3.36
DIR=$PEERS_HOME/llama-server
VENV=$DIR/venv  # only the build tools (cmake, ninja) and pip's download of the sdist
BIN=$DIR/build/bin/llama-server
PARALLEL=32
SLOT_TOKENS=${SLOT_TOKENS:-512}  # each slot's context (compare.py sets it for longer prompts)

build() {  # build [CMAKE OPTIONS...]
  local src
  src=$(echo "$DIR"/llama*cpp*python-"$VERSION"/vendor/llama.cpp)
  rm -rf "$DIR/build"
  PATH="$VENV/bin:$PATH" cmake -S "$src" -B "$DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "$@"
  PATH="$VENV/bin:$PATH" cmake --build "$DIR/build" --target llama-server llama-quantize -j "$(nproc)"
}

# Whether the built server answers one completion (a kernel this CPU cannot run kills it first).
answers() {
  local port=8099 pid ok=1
  "$BIN" --model "$(default_gguf)" --host 127.0.0.1 --port $port --threads 2 --ctx-size 512 >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 120); do
    if curl -sf "http://127.0.0.1:$port/completion" -d '{"prompt": "Hello", "n_predict": 4}' >/dev/null; then
      ok=0; break
    fi
    kill -0 $pid 2>/dev/null || break
    sleep 1
  done
  kill $pid 2>/dev/null || true
  wait $pid 2>/dev/null || true
  return $ok
}

install() {
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install cmake ninja
  "$VENV/bin/pip" download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR/sdist"
  tar -xzf "$DIR"/sdist/llama*cpp*python-"$VERSION".tar.gz -C "$DIR"
  build -DGGML_NATIVE=ON
  if answers; then
    echo "native" > "$DIR/variant"
  else
    local flags opts=(-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
    flags=$(grep -m1 '^flags' /proc/cpuinfo)
    for f in avx512f:AVX512 avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
      [[ " $flags " == *" ${f%%:*} "* ]] && opts+=("-DGGML_${f#*:}=ON")
    done
    echo "the native build crashed on this CPU; rebuilding with ${opts[*]}" >&2
    build "${opts[@]}"
    answers || { echo "the rebuilt llama-server does not answer either" >&2; exit 1; }
    echo "${opts[*]}" > "$DIR/variant"
  fi
  echo "llama-server build: $(cat "$DIR/variant")"
}

serve() {
  local port=${1:-8002}
  shift || true
  echo "llama-server build: $(cat "$DIR/variant" 2>/dev/null || echo unknown)" >&2
  # The context is split evenly between the slots: 512 tokens each holds ~100 prompt + 128 output tokens.
  exec "$BIN" --model "$(default_gguf)" --alias "$MODEL_NAME" --host 127.0.0.1 --port "$port" \
    --threads 2 --parallel "$PARALLEL" --ctx-size $((PARALLEL * SLOT_TOKENS)) --jinja "$@"
}

# A Q4_K_M file of the layout users download (hidden sizes that are multiples of 256, so the K-quants serve every
# matmul: Q4_K, with Q6_K for the output layer and half of down / v), where the embedded model's 576 columns make
# most of its Q4_K_M copy Q5_0: a random-weight Llama of ~740M parameters (hidden 2048, 12 layers, GQA 16 / 4,
# SmolLM2's tokenizer) written by transformers, converted by llama.cpp's convert_hf_to_gguf.py and quantized by
# llama-quantize (~1 minute). Its output is noise; what it measures is how fast each server reads such a file.
k_quant_model() {
  local out=${1:?usage: $0 k-quant-model OUT.gguf} work src
  work=$(mktemp -d)
  src=$(echo "$DIR"/llama*cpp*python-"$VERSION"/vendor/llama.cpp)
  "$REPO/.venv/bin/python" - "$work/hf" <<'PY'
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from slipstream.model.loader import hf_directory, load_tokenizer
out = sys.argv[1]
config = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=12,
                     num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=8192,
                     rope_theta=100000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
torch.manual_seed(0)
LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
load_tokenizer(hf_directory(None)).save_pretrained(out)  # (the embedded model's, as slipstream converts it)
PY
  PYTHONPATH="$src/gguf-py" "$REPO/.venv/bin/python" "$src/convert_hf_to_gguf.py" "$work/hf" --outtype f16 \
    --outfile "$work/f16.gguf"
  LD_LIBRARY_PATH="$(dirname "$(find "$DIR/build" -name 'libllama.so*' | head -1)"):$(dirname \
    "$(find "$DIR/build" -name 'libggml.so*' | head -1)")" "$DIR/build/bin/llama-quantize" "$work/f16.gguf" "$out" Q4_K_M
  rm -rf "$work"
}

case "${1:-}" in
  k-quant-model) shift; k_quant_model "$@"; exit ;;
esac
dispatch "$@"
