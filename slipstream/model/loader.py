"""Find a model's files and turn them into (config, tokenizer, weights).

Accepted: nothing (the embedded SmolLM2-135M-Instruct GGUF), a `.gguf` file, a Hugging Face
directory (config.json + *.safetensors), or a repo id already in the local Hugging Face cache.
The network is never tried. A GGUF file is converted once into a cached Hugging Face directory: config,
tokenizer, the file's quantized rows of every tensor the block kernels take (the cache is about the file's
size), and float32 safetensors of the rest (norms, types no kernel takes). Later starts only memory-map it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Collection, Iterator
from pathlib import Path

import numpy as np
import torch

from slipstream.kernels import GGUF_KERNEL_TYPES
from slipstream.model.locate import ModelNotFoundError, resolve_model

logger = logging.getLogger(__name__)

GGUF_BLOCKS_FILE = "gguf-blocks.safetensors.bin"  # not *.safetensors: iter_weights must not read it
GGUF_TYPES_FILE = "gguf-tensor-types.json"  # each tensor's type in the GGUF file (for the load report)


# GGUF tensor names (llama.cpp) -> transformers names
_GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _gguf_name(name: str) -> str:
    base, _, suffix = name.rpartition(".")
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.{suffix}"
    return f"{_GGUF_NAMES[base]}.{suffix}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (it stores RoPE pairs interleaved, HF halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_cache_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|v4".encode()).hexdigest()[:16]
    root = Path(os.environ.get("SLIPSTREAM_CACHE", Path.home() / ".cache" / "slipstream"))
    return root / "gguf" / f"{path.stem}-{key}"


GGUF_SOURCE_FILE = "source"  # in a converted directory: the GGUF file it was converted from


def _prune_stale_conversions(out: Path, path: Path) -> None:
    """Remove the conversions that `out` (of `path`) supersedes or that nothing can use again (each about its file's
    size, they would pile up): of an earlier state of `path`, or by an earlier converter; of a file that is gone
    (its key had the file's path, size and time). A conversion records its source; one of `path`'s name that does
    not (made before the record was) is removed too: at worst, another file of that name gets converted again.
    Unfinished ones (.tmp) stay: another process may be writing one."""
    conversion, of_path = re.compile(r".+-[0-9a-f]{16}"), re.compile(re.escape(path.stem) + r"-[0-9a-f]{16}")
    for d in out.parent.iterdir():
        if d == out or not conversion.fullmatch(d.name) or not d.is_dir():
            continue
        source = d / GGUF_SOURCE_FILE
        if not source.is_file():
            if not of_path.fullmatch(d.name):
                continue
            why = "it names no source (an earlier converter's)"
        elif (named := source.read_text()) == str(path.resolve()):
            why = f"superseded by {out.name}"
        elif not Path(named).exists():
            why = f"its source {named} is gone"
        else:
            continue
        logger.info("removing the GGUF conversion %s: %s", d, why)
        shutil.rmtree(d, ignore_errors=True)


def convert_gguf(path: Path) -> Path:
    """Convert a GGUF into a Hugging Face directory (cached; rebuilt when the file changes)."""
    out = _gguf_cache_dir(path)
    if (out / "complete").is_file():
        return out
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer

    logger.info("converting %s into %s (once)", path, out)
    tmp = out.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if config.model_type not in _GGUF_ARCHITECTURES:
        raise ModelNotFoundError(f"GGUF architecture {config.model_type!r} is not supported")
    config.architectures = [_GGUF_ARCHITECTURES[config.model_type]]
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    reader = GGUFReader(path)
    tensors: dict[str, torch.Tensor] = {}
    blocks: dict[str, torch.Tensor] = {}  # the file's own quantized rows, for the CPU block kernels
    block_types: dict[str, str] = {}
    file_types: dict[str, str] = {}
    for t in tqdm(reader.tensors, desc="converting", unit="tensor", disable=None):
        file_types[t.name] = t.tensor_type.name
        name = _gguf_name(t.name)
        heads = None  # llama.cpp permuted the rows of q and k
        if config.model_type == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
        if int(t.tensor_type) in GGUF_KERNEL_TYPES and len(t.shape) == 2:
            rows = np.array(t.data)  # [out, bytes per row]: rows of whole blocks
            blocks[name] = torch.from_numpy(np.ascontiguousarray(rows if heads is None else _unpermute(rows, heads)))
            block_types[name] = str(int(t.tensor_type))
            continue
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w if heads is None else _unpermute(w, heads)
        tensors[name] = torch.from_numpy(np.require(w, requirements=["C", "W"]))  # F32 tensors: read-only mmap
    config.tie_word_embeddings = "lm_head.weight" not in tensors and "lm_head.weight" not in blocks
    save_file(tensors, tmp / "model.safetensors")
    save_file(blocks, tmp / GGUF_BLOCKS_FILE, metadata=block_types)
    (tmp / GGUF_TYPES_FILE).write_text(json.dumps(file_types))
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / GGUF_SOURCE_FILE).write_text(str(path.resolve()))
    if os.path.exists(out):
        shutil.rmtree(out)
    tmp.rename(out)
    (out / "complete").touch()
    _prune_stale_conversions(out, path)
    return out


def hf_directory(model: str | None) -> Path:
    path = resolve_model(model)
    return convert_gguf(path) if path.suffix == ".gguf" else path


def load_config(directory: Path):
    from transformers import AutoConfig

    with open(directory / "config.json") as f:
        raw = json.load(f)
    # ERNIE's original name (with the trailing underscore) is not registered in transformers.
    if raw.get("model_type") == "ernie4_5" or "Ernie4_5_ForCausalLM" in raw.get("architectures", []):
        from transformers import Ernie4_5Config

        config = Ernie4_5Config(**{k: v for k, v in raw.items() if k not in ("auto_map", "model_type")})
        config.architectures = raw.get("architectures") or ["Ernie4_5ForCausalLM"]
        return config
    return AutoConfig.from_pretrained(directory)


PADDLE_PREFIX = "ernie."


def iter_weights(directory: Path, skip: Collection[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, tensor) for every tensor of the checkpoint but those named in `skip` (never read: a
    converted GGUF's tensors that its blocks serve; the others' blocks are dequantized here). A Paddle-layout ERNIE
    checkpoint (`ernie.` prefix, every linear weight, lm_head included, stored [in, out]) is mapped
    to the transformers layout; its fused `qkv_proj` / `up_gate_proj` keep their names."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{directory} has no *.safetensors files")
    paddle = False
    for file in files:
        with safe_open(file, framework="pt") as f:
            paddle = paddle or any(name.startswith(PADDLE_PREFIX) for name in f.keys())
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name in skip:
                    continue
                tensor = f.get_tensor(name)
                if paddle:
                    if name.startswith(PADDLE_PREFIX):
                        name = "model." + name.removeprefix(PADDLE_PREFIX)
                    if tensor.dim() == 2 and "embed_tokens" not in name:
                        tensor = tensor.t()
                yield name, tensor
    from slipstream.model.layers import dequantized, split_gguf_blocks

    for name, rows, qtype in iter_gguf_blocks(directory):
        if name not in skip:  # a converted GGUF's weights that no block kernel serves here (CUDA, say)
            yield name, dequantized(split_gguf_blocks(rows, qtype), qtype)


def iter_gguf_blocks(directory: Path) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(transformers name, quantized rows [out, bytes per row], GGML type) of a converted GGUF's weights."""
    path = directory / GGUF_BLOCKS_FILE
    if not path.is_file():
        return
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        types = f.metadata() or {}
        for name in f.keys():
            yield name, f.get_tensor(name), int(types[name])


def checkpoint_tensor_types(directory: Path) -> Counter[str]:
    """How many tensors of each type the checkpoint holds: the GGUF file's types (Q4_K, Q6_K, F32, ...) for a
    converted GGUF, else the safetensors dtypes (BF16, F32, ...)."""
    types_file = directory / GGUF_TYPES_FILE
    if types_file.is_file():
        return Counter(json.loads(types_file.read_text()).values())
    from safetensors import safe_open

    counts: Counter[str] = Counter()
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            counts.update(f.get_slice(name).get_dtype() for name in f.keys())
    return counts


def half_precision_checkpoint(directory: Path) -> torch.dtype | None:
    """bfloat16 / float16 when every floating-point tensor of a safetensors checkpoint has that dtype, else None."""
    floating = {t for t in checkpoint_tensor_types(directory) if t in ("BF16", "F16", "F32", "F64")}
    return {frozenset({"BF16"}): torch.bfloat16, frozenset({"F16"}): torch.float16}.get(frozenset(floating))


def load_tokenizer(directory: Path, tokenizer: str | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer or directory)
