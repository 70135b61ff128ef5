#!/usr/bin/env bash
# llama.cpp's C++ llama-server, built (cmake, ~8 min on 2 cores) from the llama.cpp tree vendored in the
# llama-cpp-python sdist on PyPI; serves the same Q4_1 GGUF with 2 threads and 32 slots.
source "$(dirname "$0")/common.sh"

VERSION=0.3.36
DIR=$PEERS_HOME/llama-server
VENV=$DIR/venv  # only the build tools (cmake, ninja) and pip's download of the sdist
BIN=$DIR/build/bin/llama-server
PARALLEL=32

install() {
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install cmake ninja
  "$VENV/bin/pip" download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR/sdist"
  tar -xzf "$DIR"/sdist/llama*cpp*python-"$VERSION".tar.gz -C "$DIR"
  local src
  src=$(echo "$DIR"/llama*cpp*python-"$VERSION"/vendor/llama.cpp)
  PATH="$VENV/bin:$PATH" cmake -S "$src" -B "$DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
  PATH="$VENV/bin:$PATH" cmake --build "$DIR/build" --target llama-server -j "$(nproc)"
}

serve() {
  local port=${1:-8002}
  shift || true
  # The context is split evenly between the slots: 512 tokens each holds ~100 prompt + 128 output tokens.
  exec "$BIN" --model "$(default_gguf)" --alias "$MODEL_NAME" --host 127.0.0.1 --port "$port" \
    --threads 2 --parallel "$PARALLEL" --ctx-size $((PARALLEL * 512)) --jinja "$@"
}

dispatch "$@"
