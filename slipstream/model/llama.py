"""The Llama family in one file: Llama, Qwen2 (qkv bias), Qwen3 (q/k RMSNorm) and ERNIE 4.5
(decoupled head_dim, interleaved RoPE, tied embeddings). They differ only in the flags below."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from slipstream.kernels import kernels
from slipstream.model.attention import PagedAttention
from slipstream.model.context import get_context
from slipstream.model.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    attach_gguf_blocks,
    attach_mixed_gguf_blocks,
    blocks_label,
    served_blocks,
)
from slipstream.model.parallel import tp_size

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Ernie4_5ForCausalLM": "ernie4_5",
    "Ernie4_5_ForCausalLM": "ernie4_5",
}


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    rope_interleaved: bool = False
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf_config(cls, config) -> ModelArgs:
        family = ARCHITECTURES[config.architectures[0]]
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (the MLP is SwiGLU)")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        bias = bool(getattr(config, "attention_bias", False) or getattr(config, "use_bias", False))
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            qkv_bias=bias or family == "qwen2",
            o_bias=bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False) or getattr(config, "use_bias", False)),
            qk_norm=family == "qwen3",
            rope_interleaved=family == "ernie4_5",
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            args.hidden_size, args.head_dim, args.num_heads, args.num_kv_heads, args.qkv_bias
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = args.head_dim
        self.o_proj = RowParallelLinear(args.num_heads * args.head_dim, args.hidden_size, args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        self.qk_norm = args.qk_norm
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        size = args.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(args.hidden_size, [size, size], args.mlp_bias)
        self.down_proj = RowParallelLinear(size, args.hidden_size, args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if (silu_and_mul := kernels().elementwise("silu_and_mul", gate_up)) is not None:
            return self.down_proj(silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(torch.nn.functional.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = Attention(args, rotary)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None):
        """(sublayer output, residual stream before it): the next norm adds the two, fused."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class CausalLM(nn.Module):
    # checkpoint name -> (our parameter name, shard id)
    packed = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # Paddle ERNIE checkpoints store these already fused: checkpoint name -> (our name, shard ids in order)
    fused = {
        "qkv_proj": ("qkv_proj", ("q", "k", "v")),
        "up_gate_proj": ("gate_up_proj", (0, 1)),  # gate first, as Paddle's swiglu reads it
    }

    def __init__(self, args: ModelArgs, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = VocabParallelEmbedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, rotary) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = ParallelLMHead(args.vocab_size, args.hidden_size)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._layer_stack = None  # built on the first step (the KV cache is bound by then)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Returns final hidden states [T, hidden]; `logits` projects the rows that need them."""
        x, residual = self.embed_tokens(input_ids), None
        ctx = get_context()
        if (stack := self.layer_stack(len(input_ids))) is not None:
            x, residual = stack.forward(x, positions, *ctx.query_rows, ctx.slot_mapping)
        else:
            for layer in self.layers:
                x, residual = layer(positions, x, residual)
        return self.norm(x, residual)[0]

    def layer_stack(self, rows: int):
        """The compiled kernels' LayerStack for a step of `rows` query rows: all layers in one call, the
        same kernels as the Python layers run. None where a layer needs its Python path (in exact mode,
        a prompt's rows beyond what the block kernels take)."""
        if self._layer_stack is None:
            self._layer_stack = build_layer_stack(self) or False
        # The stack has only the block kernels: where a layer would take another path, so must the step.
        table, layer = kernels(), self.layers[0]
        serves = self._layer_stack and all(table.gguf_matmul(lin, rows) is not None for lin in (
            layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj))
        return self._layer_stack if serves else None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.layers]

    def _shard_sizes(self) -> dict[str | int, int]:
        a = self.args
        kv = a.num_kv_heads * a.head_dim
        return {"q": a.num_heads * a.head_dim, "k": kv, "v": kv, 0: a.intermediate_size, 1: a.intermediate_size}

    def _to_params(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor, str | int | None]]:
        """(our parameter name, tensor, shard id or None) for one checkpoint tensor."""
        for ckpt_name, (ours, shard_id) in self.packed.items():
            if f".{ckpt_name}." in name:
                yield name.replace(ckpt_name, ours), tensor, shard_id
                return
        for ckpt_name, (ours, shard_ids) in self.fused.items():
            if f".{ckpt_name}." in name:
                sizes = self._shard_sizes()
                parts = tensor.split([sizes[s] for s in shard_ids], dim=0)
                for shard_id, part in zip(shard_ids, parts, strict=True):
                    yield name.replace(ckpt_name, ours), part, shard_id
                return
        yield name, tensor, None

    def linear_layers(self) -> list[nn.Module]:
        return [lin for layer in self.layers for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                          layer.mlp.gate_up_proj, layer.mlp.down_proj)]

    def quantize_linear_layers(self, qtype: int, int8_activations: bool = False) -> int:
        """Weight-only quantization at load (--quantization wint8 / wint4; wint4's blocks with `int8_activations`
        for w4a8 on a checkpoint without blocks): each decoder linear layer that has no GGUF blocks yet gets its
        weights rounded to blocks of `qtype` by the gguf package's quantizer, and loses its dense copy. The LM head
        (often the embedding table too) stays as it is. Returns how many layers it rounded."""
        from gguf import GGMLQuantizationType, quants

        rounded = 0
        for lin in self.linear_layers():
            if getattr(lin, "gguf_parts", None) is None and lin.weight.shape[1] % 32 == 0:
                blocks = quants.quantize(lin.weight.detach().float().cpu().numpy(), GGMLQuantizationType(qtype))
                attach_gguf_blocks(lin, torch.from_numpy(blocks), qtype, int8_activations=int8_activations)
                rounded += 1
        return rounded

    def load_gguf_blocks(self, blocks: Iterable[tuple[str, torch.Tensor, int]], int8_activations: bool) -> set[str]:
        """Attach the GGUF block form of the weights (one rank only), before `load_weights`: the layers that take
        blocks never hold a float32 copy. q/k/v and gate/up rows are fused in their shard order (a fused layer
        whose parts differ in type keeps each part's); a tied embedding and LM head share one set. Returns the
        checkpoint names the blocks now serve, which `load_weights` need not read."""
        modules = dict(self.named_modules())
        parts: dict[str, dict[str | int, tuple[str, torch.Tensor, int, int]]] = {}  # (name, rows, type, file's type)
        served: set[str] = set()
        for ckpt_name, file_rows, file_type in blocks:
            name = ckpt_name.removeprefix("model.").removesuffix(".weight")
            rows, qtype = served_blocks(file_rows, file_type, int8_activations)
            label = blocks_label([file_type], [qtype])
            if name == "embed_tokens":
                tied = [self.lm_head] if self.args.tie_word_embeddings else []
                attach_gguf_blocks([self.embed_tokens, *tied], rows, qtype, int8_activations, label)
                served.add(ckpt_name)
                continue
            for packed_name, (ours, shard_id) in self.packed.items():
                if name.endswith(f".{packed_name}"):
                    shard = (ckpt_name, rows, qtype, file_type)
                    parts.setdefault(name.replace(packed_name, ours), {})[shard_id] = shard
                    break
            else:
                if name in modules:
                    attach_gguf_blocks(modules[name], rows, qtype, int8_activations, label)
                    served.add(ckpt_name)
        for name, shards in parts.items():
            order = ("q", "k", "v") if name.endswith("qkv_proj") else (0, 1)
            if len(shards) != len(order):
                continue
            pieces = [shards[s][1:3] for s in order]
            types = [qtype for _, qtype in pieces]
            label = blocks_label([shards[s][3] for s in order], types)
            if len(set(types)) == 1:
                attach_gguf_blocks(modules[name], torch.cat([rows for rows, _ in pieces]), types[0], int8_activations,
                                   label)
            else:
                attach_mixed_gguf_blocks(modules[name], pieces, int8_activations, label)
            served.update(shards[s][0] for s in order)
        return served

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (transformers-style name, full tensor) pairs; each parameter takes its own shard."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for ckpt_name, ckpt_tensor in weights:
            ckpt_name = ckpt_name.removeprefix("model.")
            if "rotary_emb" in ckpt_name:
                continue
            if ckpt_name == "lm_head.weight" and self.args.tie_word_embeddings:
                continue
            for name, tensor, shard in self._to_params(ckpt_name, ckpt_tensor):
                param = params.get(name)
                if param is None:
                    raise ValueError(f"checkpoint tensor {ckpt_name!r} has no place in this model")
                loaded.add(name)
                loader = getattr(param, "weight_loader", None)
                tensor = tensor.to(param.dtype)
                if loader is None:
                    param.data.copy_(tensor)
                elif shard is None:
                    loader(param, tensor)
                else:
                    loader(param, tensor, shard)
        missing = {n for n, p in params.items() if n not in loaded and p.numel()}  # (empty: GGUF blocks serve it)
        if self.args.tie_word_embeddings:
            missing.discard("lm_head.weight")
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")


def build_layer_stack(model: CausalLM):
    """A LayerStack over `model`'s weights and KV cache, or None when some layer has what the stack
    does not run: dense-only weights, biases, q/k norms, several ranks, a cache the attention kernel
    does not take (head_dim not a multiple of 8, bfloat16)."""
    table, args = kernels(), model.args
    attn = model.layers[0].self_attn
    if not table.cache_fits(attn.attn.k_cache) or tp_size() > 1 or args.qk_norm:
        return None
    linears = model.linear_layers()
    if any(getattr(lin, "gguf_parts", None) is None or lin.bias is not None for lin in linears):
        return None
    int8 = {lin.int8_activations for lin in linears}
    if len(int8) > 1 or not table.layer_stack_usable(int8.pop()):
        return None
    return table.ops.LayerStack(
        [layer.input_layernorm.weight for layer in model.layers],
        [layer.post_attention_layernorm.weight for layer in model.layers],
        [[t for split, _ in lin.gguf_parts for t in split] for lin in linears],
        [[qtype for _, qtype in lin.gguf_parts] for lin in linears],
        [layer.self_attn.attn.k_cache for layer in model.layers],
        [layer.self_attn.attn.v_cache for layer in model.layers],
        attn.rotary.cos, attn.rotary.sin, args.rms_norm_eps, attn.num_heads, attn.num_kv_heads, args.head_dim,
        args.rope_interleaved, attn.attn.scale, linears[0].int8_activations,
        getattr(linears[0], "rounds_to_bf16", False),  # (gguf_linear_rounded's kernels, as gguf_matmul picks them)
    )


def attention_window(config) -> int | None:
    """The sliding window some layers attend within, or None where every layer sees the whole context.
    Mistral slides whenever `sliding_window` is set; Qwen2/Qwen3 mark the sliding layers in
    `layer_types` (older configs: `use_sliding_window`). slipstream computes full attention only,
    which is the same as sliding attention for contexts up to the window."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if window and "sliding_attention" in layer_types else None
    return window if window and getattr(config, "use_sliding_window", True) else None


def check_tp_compatible(args: ModelArgs, n: int) -> None:
    """Heads must split evenly; KV heads must split evenly or be replicated evenly."""
    if args.num_heads % n or (args.num_kv_heads % n and n % args.num_kv_heads):
        raise ValueError(
            f"--tensor-parallel-size {n} does not fit this model: it has {args.num_heads} attention "
            f"heads and {args.num_kv_heads} KV heads; the size must divide the attention heads, and "
            f"it and the KV heads must divide one another"
        )
    assert tp_size() in (1, n)


def build_model(config, dtype: torch.dtype, device: torch.device, max_positions: int) -> CausalLM:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    args = ModelArgs.from_hf_config(config)
    check_tp_compatible(args, tp_size())
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        base = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / base ** (torch.arange(0, args.head_dim, 2, dtype=torch.int64).float() / args.head_dim)
        scaling = 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    with torch.device(device):
        rotary = RotaryEmbedding(inv_freq, max(max_positions, args.max_position_embeddings), scaling,
                                 args.rope_interleaved)
        torch.set_default_dtype(dtype)
        try:
            model = CausalLM(args, rotary)
        finally:
            torch.set_default_dtype(torch.float32)
    rotary.to(device)
    return model.eval()
