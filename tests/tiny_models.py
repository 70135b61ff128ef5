"""Tiny random checkpoints made with transformers' own classes and saved as real ones are
(config.json, model.safetensors, tokenizer files), so tests can run every architecture in seconds.

Weights are drawn so that activations stay near unit scale whatever the sizes, attention is sharp
and every parameter (biases and norms included) matters: a wrong RoPE layout or a dropped bias
moves the logits well beyond test tolerances, which transformers' default initialisation (std
0.02, zero biases) would hide.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

# Text the tokenizer is trained on: byte-level BPE covers any input, this only shapes the merges.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Once upon a time, in a small village by the sea.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "中国的首都是北京。请用一句话介绍一下长城。人工智能正在改变世界。",
    "Large language models predict the next token; serving them needs a paged KV cache and batching.",
]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(vocab_size: int = 512):
    """A small byte-level BPE tokenizer with a ChatML template; `</s>` and `<|im_end|>` end turns."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>", pad_token="</s>",
        chat_template=CHAT_TEMPLATE,
    )


def _classes(arch: str):
    import transformers as tf

    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "ernie4_5": (tf.Ernie4_5Config, tf.Ernie4_5ForCausalLM),
    }[arch]


def save_tiny_model(
    arch: str,
    directory: Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    weight_gain: float = 1.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> Path:
    """Create `directory` holding a random `arch` model (llama, qwen2, qwen3, ernie4_5) in the
    Hugging Face layout, its tensors saved as `dtype`, with a tokenizer whose vocabulary is the model's.
    Returns `directory`."""
    config_cls, model_cls = _classes(arch)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(directory)
    special = tokenizer.convert_tokens_to_ids
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim or hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=special("<s>"),
        eos_token_id=special("<|im_end|>"),
        pad_token_id=special("</s>"),
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            else:  # matrices scaled by their input size, biases by the hidden size
                p.normal_(0.0, weight_gain / (p.shape[-1] if p.dim() == 2 else hidden_size) ** 0.5)
    model.to(dtype).save_pretrained(directory)
    return directory


def save_paddle_copy(src: Path, dst: Path, fused: bool = True) -> Path:
    """Rewrite an ERNIE 4.5 checkpoint the way PaddlePaddle publishes it: `ernie.` key prefix,
    linear weights stored [in, out], q/k/v fused into `qkv_proj` and gate/up into `up_gate_proj`
    (unless `fused` is False), the original `Ernie4_5_ForCausalLM` name and a flat `rope_theta`."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(src / "model.safetensors")
    if fused:
        for layer in {name.rsplit(".self_attn.", 1)[0] for name in tensors if ".self_attn." in name}:
            attn, mlp = f"{layer}.self_attn", f"{layer}.mlp"
            for kind in ("weight", "bias"):
                if f"{attn}.q_proj.{kind}" in tensors:
                    parts = [tensors.pop(f"{attn}.{p}_proj.{kind}") for p in "qkv"]
                    tensors[f"{attn}.qkv_proj.{kind}"] = torch.cat(parts)
                if f"{mlp}.gate_proj.{kind}" in tensors:
                    parts = [tensors.pop(f"{mlp}.{p}_proj.{kind}") for p in ("gate", "up")]
                    tensors[f"{mlp}.up_gate_proj.{kind}"] = torch.cat(parts)
    paddle = {}
    for name, t in tensors.items():
        if name.startswith("model."):
            name = "ernie." + name.removeprefix("model.")
        if t.dim() == 2 and "embed_tokens" not in name:
            t = t.t()
        paddle[name] = t.contiguous()
    save_file(paddle, dst / "model.safetensors", metadata={"format": "pd"})
    config = json.loads((src / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.pop("transformers_version", None)
    config.update(architectures=["Ernie4_5_ForCausalLM"], rope_theta=rope["rope_theta"], use_rmsnorm=True,
                  use_flash_attention=False)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, dst / f.name)
    return dst
