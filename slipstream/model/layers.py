"""Building blocks shared by every architecture. Linear and embedding layers are tensor-parallel:
each parameter carries a `weight_loader` that copies just this rank's shard from a full tensor,
so checkpoint loading never materialises another rank's weights on the device."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from slipstream.kernels import (
    FIVE_BIT_TYPES,
    GGUF_KERNEL_TYPES,
    HALF_DTYPES,
    HALF_TYPES,
    HIGH_BIT_TYPES,
    Q4_TYPES,
    kernels,
)
from slipstream.kernels.dispatch import pack_rounded_bf16
from slipstream.model.parallel import all_reduce, gather_last_dim, tp_rank, tp_size


class GgufPart(NamedTuple):
    """Rows of a layer's weight as GGUF blocks of one type, split (and laid out) for the kernels."""

    split: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    qtype: int


def attach_gguf_blocks(layers: nn.Module | list[nn.Module], blocks: torch.Tensor, qtype: int,
                       int8_activations: bool, label: str | None = None) -> None:
    """Give `layers` (one, or a tied embedding and LM head: modules sharing one weight) the GGUF block form of
    their weights, split into the kernel's layout (`kernel_layout`). The blocks are then the weights: no float32 copy
    is kept, what no block kernel serves (a matmul of many rows, an embedding lookup) takes their values dequantized
    for the call; an embedding's lookups read whichever layout its blocks have (`row_blocks`). `label`: what the load
    report calls them (default: qtype's name)."""
    part = GgufPart(kernel_layout(blocks, qtype, int8_activations), qtype)
    _attach(layers, (part,), int8_activations, label or GGUF_KERNEL_TYPES[qtype])


def served_blocks(blocks: torch.Tensor, qtype: int, int8_activations: bool) -> tuple[torch.Tensor, int]:
    """GGUF rows of blocks as the kernels take them, with their type: in exact mode, Q5_0's rewritten as the Q8_0
    blocks of the same weights where the kernel table says so (KernelTable.exact_block_type); else as they are."""
    served = qtype if int8_activations else kernels().exact_block_type(qtype)
    if served == qtype:
        return blocks, qtype
    assert GGUF_KERNEL_TYPES[qtype] == "Q5_0" and GGUF_KERNEL_TYPES[served] == "Q8_0"
    out = blocks.shape[0]
    quants = _split_q5(blocks, "Q5_0")[0].view(out, -1, 32)  # q - 16, a byte each
    return torch.cat([blocks.view(out, -1, 22)[..., :2], quants], dim=-1).reshape(out, -1), served


def blocks_label(file_types: list[int], served_types: list[int]) -> str:
    """What the load report calls a layer's blocks, part by part (one, or a fused layer's): the file's types ("Q5_0",
    "Q4_1+Q4_1+Q8_0") and the type they are served as where that differs ("Q5_0 as Q8_0", parts served as one type
    "Q5_0+Q5_0+Q8_0 as Q8_0", parts served as several "Q5_0 as Q8_0+Q6_K")."""
    if len(set(served_types)) > 1:
        return "+".join(blocks_label([f], [s]) for f, s in zip(file_types, served_types, strict=True))
    names, served = [GGUF_KERNEL_TYPES[t] for t in file_types], served_types[0]
    label = names[0] if len(set(names)) == 1 else "+".join(names)
    return label if set(file_types) == {served} else f"{label} as {GGUF_KERNEL_TYPES[served]}"


def attach_mixed_gguf_blocks(layer: nn.Module, parts: list[tuple[torch.Tensor, int]], int8_activations: bool,
                             label: str) -> None:
    """attach_gguf_blocks for a fused layer (q/k/v, gate/up) whose parts have different types (a Q4_K_M file's
    Q5_0 q/k with a Q8_0 v, or Q4_K q/k with a Q6_K v): each part keeps its type, in its own kernel layout, and the
    layer's output is theirs side by side."""
    kept = tuple(GgufPart(kernel_layout(rows, qtype, int8_activations), qtype) for rows, qtype in parts)
    _attach(layer, kept, int8_activations, label)


def kernel_layout(blocks: torch.Tensor, qtype: int, int8_activations: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF rows of blocks split (`split_gguf_blocks`: quants [out, blocks * quant bytes], fp16 scales and (Q4_1)
    mins [out, blocks]) and laid out as this CPU's kernel multiplies them fastest: with `int8_activations`
    (`--quantization w4a8`) the 5- and 6-bit types at their own bits a weight (`interleave_high_bit_rows`), the others
    by `int8_layout`; with float32 activations the 5-bit types at 5 bits a weight where gguf_linear takes them so
    (`high_bit_rows`), the rest as split."""
    table, split = kernels(), split_gguf_blocks(blocks, qtype)
    if int8_activations and qtype in HIGH_BIT_TYPES and blocks.shape[0] % table.q4_group_rows() == 0:
        return interleave_high_bit_rows(split, qtype, table.q4_group_rows())
    if int8_activations:
        return int8_layout(split, qtype)
    return high_bit_rows(split, qtype) if qtype in FIVE_BIT_TYPES and table.serves_high_bit_rows() else split


def int8_layout(split: tuple[torch.Tensor, torch.Tensor, torch.Tensor], qtype: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split blocks (row layout) in the layout this CPU's int8 kernel (gguf_linear_q8) multiplies fastest, where
    their row count allows: Q4_0 / Q4_1 / Q4_K interleaved by 8 or 16 rows (`interleave_q4_rows`), Q8_0 by 8 or 16
    (`interleave_byte_rows`). (The 5- and 6-bit types take nibble groups: kernel_layout.)"""
    table, out = kernels(), split[0].shape[0]
    if qtype in Q4_TYPES and out % table.q4_group_rows() == 0:
        return interleave_q4_rows(*split, table.q4_group_rows())
    if GGUF_KERNEL_TYPES[qtype] == "Q8_0" and (group := table.q8_group_rows()) and out % group == 0:
        return interleave_byte_rows(*split, group)
    return split


def keep_half_precision(layers: list[nn.Module], rounded: bool) -> bool:
    """Where the weight of `layers` (one, or modules sharing it) is a bfloat16 (or float16) tensor — held so since
    loading (`hold_half_precision_weights`), or float32 with exactly such values —, keep it in that form: half the
    bytes, served by gguf_linear with float32 activations (exact), no float32 copy. `rounded`: the weights were
    rounded to it (`--dtype bfloat16`), a mode that may round activations too where that is faster (batches through
    a native bf16 GEMM on a packed copy, `layer.bf16_packed`: KernelTable.rounded_half_linear). Returns whether it
    did."""
    weight = layers[0].weight.data
    for qtype, dtype in HALF_DTYPES.items():
        half = weight if weight.dtype == dtype else weight.to(dtype) if weight.dtype == torch.float32 else None
        if half is not None and (half is weight or torch.equal(half.float(), weight)):
            rows = half.view(torch.uint8).view(weight.shape[0], -1)
            _attach(layers, (GgufPart((rows, torch.empty(0), torch.empty(0)), qtype),), False, HALF_TYPES[qtype])
            packed = pack_rounded_bf16(rows) if rounded and HALF_TYPES[qtype] == "BF16" else None
            for layer in layers:
                if packed is not None and type(layer) is not VocabParallelEmbedding:  # (its lookups read rows)
                    layer.bf16_packed = packed
            return True
    return False


def _half_precision_candidates(model: nn.Module) -> list[list[nn.Module]]:
    """The linear layers, embedding and LM head of `model` that gguf_linear could serve from half-precision rows
    (no GGUF blocks, inputs a multiple of 32), modules that share one weight (a tied embedding and LM head) as one."""
    sharing: dict[int, list[nn.Module]] = {}
    for layer in model.modules():
        if isinstance(layer, LinearBase | VocabParallelEmbedding) and getattr(layer, "gguf_parts", None) is None:
            sharing.setdefault(id(layer.weight), []).append(layer)
    return [layers for layers in sharing.values() if layers[0].weight.dim() == 2 and not layers[0].weight.shape[1] % 32]


def hold_half_precision_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Before loading a checkpoint whose tensors are all `dtype` (bfloat16 / float16), in exact mode: its linear,
    embedding and LM head weights are held in that dtype as they load, so they never take float32's memory (twice
    theirs); keep_half_precision_weights then keeps them as rows, without a copy."""
    for layers in _half_precision_candidates(model):
        weight = layers[0].weight
        weight.data = torch.empty(weight.shape, dtype=dtype, device=weight.device)


def keep_half_precision_weights(model: nn.Module, rounded: bool) -> None:
    """The linear layers, embedding and LM head of `model` whose weights are bfloat16 / float16
    (`_half_precision_candidates`) keep them so (`keep_half_precision`): a half-precision checkpoint in exact mode,
    or weights `rounded` to it by `--dtype bfloat16` / `float16`."""
    for layers in _half_precision_candidates(model):
        keep_half_precision(layers, rounded)


def round_activations_to_bf16(model: nn.Module) -> None:
    """`--dtype bfloat16` on a CPU with the kernels: the block-served matmuls of `model` may round x to bf16 where that
    is faster (KernelTable.rounds_on_tiles: the AMX tiles take one product a block for three), as a bf16 model rounds
    it; w4a8's int8 activations aside."""
    for layer in model.modules():
        if getattr(layer, "gguf_parts", None) is not None and not layer.int8_activations:
            layer.rounds_to_bf16 = True


def round_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """`--dtype bfloat16` / `float16` on a CPU with the kernels: round every weight of `model` that no GGUF block
    holds to `dtype` (kept in float32, where keep_half_precision_weights then finds them exact), so the model has the
    half-precision model's weights and computes on them in float32."""
    for p in model.parameters():  # (those of block-served layers are empty: their blocks are the weights)
        if p.is_floating_point():
            p.data = p.data.to(dtype).float()


def _attach(layers: nn.Module | list[nn.Module], parts: tuple[GgufPart, ...], int8_activations: bool, label: str
            ) -> None:
    layers = layers if isinstance(layers, list) else [layers]
    for layer in layers:
        layer.gguf_parts = parts  # rows stacked in order
        layer.gguf_label = label  # what the load report calls it
        layer.int8_activations = int8_activations
    for layer in layers:  # (an embedding looks its rows up in the blocks, whatever their layout: row_blocks)
        layer.weight.data = torch.empty(0)


_BYTE_FORM = ("Q5_0", "Q5_1", "Q5_K", "Q6_K")  # types split_gguf_blocks already gives a byte per weight
# What the byte form's signed quants are offset by where they are kept unsigned (5- and 6-bit layouts).
_QUANT_OFFSETS = {"Q5_0": 16, "Q6_K": 32}


def byte_form(split: tuple[torch.Tensor, torch.Tensor, torch.Tensor], qtype: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split blocks of any kernel type as a byte per weight (int8 as uint8), float32 scale and (or empty) min
    per 16 weights: the form Q5_0 / Q5_1 / Q5_K / Q6_K take. Exact: every weight is the same scale x quant
    (+ min) as before."""
    quants, scales, mins = split
    name, out = GGUF_KERNEL_TYPES[qtype], quants.shape[0]
    if qtype in FIVE_BIT_TYPES and is_high_bit_rows(split):
        blocks = quants.view(out, -1, 20)
        low = blocks[..., :16]
        fifth = (blocks[..., 16:].unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1  # [out, nb, 4, 8]
        q = (torch.cat([low & 0x0F, low >> 4], dim=-1) | (fifth.reshape(out, -1, 32) << 4)).to(torch.int8)
        d, m = (t.view(torch.float16).float() if t.dtype == torch.int16 else t for t in (scales, mins))
        return (q - _QUANT_OFFSETS.get(name, 0)).reshape(out, -1).view(torch.uint8), _per16(d), _per16(m)
    if name in _BYTE_FORM:
        return split
    if name == "Q8_0":
        q, d = quants.view(torch.int8).view(out, -1), scales.view(torch.float16).float()
    else:
        packed = quants.view(out, -1, 16)
        q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).to(torch.int8) - (8 if name == "Q4_0" else 0)
        d = scales if name == "Q4_K" else scales.view(torch.float16).float()
    m = mins if name == "Q4_K" else mins.view(torch.float16).float() if mins.numel() else mins
    return q.reshape(out, -1).view(torch.uint8), _per16(d), _per16(m)


def _per16(per32: torch.Tensor) -> torch.Tensor:
    """Values per 32 weights ([out, ...]) as values per 16, rows [out, 2 x as many]."""
    if not per32.numel():
        return per32
    return per32.reshape(per32.shape[0], -1).repeat_interleave(2, dim=1).contiguous()


def dequantize_blocks(split: tuple[torch.Tensor, torch.Tensor, torch.Tensor], qtype: int) -> torch.Tensor:
    """The float32 weights of GGUF blocks split for the kernels (row layout), as the gguf package dequantizes them:
    scale x quant (+ min) of their byte form. (The reference of the gguf_dequantize kernel, and its fallback.)"""
    if qtype in HALF_TYPES:
        return split[0].view(HALF_DTYPES[qtype]).float()
    quants, scales, mins = byte_form(split, qtype)
    out = quants.shape[0]
    w = quants.view(torch.int8).view(out, -1, 16).float() * scales.unsqueeze(-1)
    return (w + mins.unsqueeze(-1) if mins.numel() else w).view(out, -1)


def split_gguf_blocks(blocks: torch.Tensor, qtype: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF rows of blocks -> (quants, scales, mins) as gguf_linear takes them. Classic types: their (fp16 scale,
    [fp16 min,] quants) blocks split apart. K-quants: unpacked (`_split_k_quants`)."""
    if qtype in HALF_TYPES:  # (rows of half-precision weights as bytes: nothing to split)
        return blocks.contiguous(), torch.empty(0), torch.empty(0)
    name = GGUF_KERNEL_TYPES[qtype]
    if name.endswith("_K"):
        return _split_k_quants(blocks, name)
    if name in ("Q5_0", "Q5_1"):
        return _split_q5(blocks, name)
    head = 4 if name == "Q4_1" else 2
    quant_bytes = 32 if name == "Q8_0" else 16
    out = blocks.shape[0]
    b = blocks.view(out, -1, head + quant_bytes)

    def halves(offset: int) -> torch.Tensor:
        return b[:, :, offset : offset + 2].contiguous().view(torch.int16).view(out, -1)

    mins = halves(2) if head == 4 else torch.empty(0, dtype=torch.int16)
    return b[:, :, head:].reshape(out, -1).contiguous(), halves(0), mins


_K_BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}  # per 256 weights


def _k_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's 12 bytes of eight 6-bit scales and mins per super-block (gguf's get_scale_min)."""
    s = packed.reshape(*packed.shape[:-1], 3, 4).int()
    d, m, m_d = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    scales = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scales.float(), mins.float()


def _nibbles(b: torch.Tensor, out: int) -> torch.Tensor:
    """Bytes [out, sb, 32 c] -> [out, sb, 2 c, 32]: each 32 bytes' low nibbles, then their high nibbles."""
    q = b.reshape(out, b.shape[1], -1, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 1, 2, 1)
    return (q & 0x0F).reshape(out, b.shape[1], -1, 32)


def _split_q5(blocks: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q5_0 / Q5_1 blocks (fp16 d, [fp16 m,] 32 high bits, 16 bytes of low nibbles) -> a byte per weight (Q5_0:
    q - 16, Q5_1: q) with float32 scale (and min) per 16, the kernels' form for Q5_K too: the same values as
    gguf's d * (q - 16) and d * q + m."""
    out = blocks.shape[0]
    head = 4 if name == "Q5_1" else 2
    b = blocks.view(out, -1, head + 20)
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # [out, nb, 1]
    high = b[..., head : head + 4].contiguous().view(torch.int32)  # [out, nb, 1]: bit i is weight i's fifth bit
    bits = (high >> torch.arange(32, dtype=torch.int32)) & 1
    low = b[..., head + 4 :]
    q = torch.cat([low & 0x0F, low >> 4], dim=-1).int() | (bits << 4)  # [out, nb, 32], 0..31
    q = (q - 16 if name == "Q5_0" else q).to(torch.int8)
    mins = b[..., 2:4].contiguous().view(torch.float16).float() if name == "Q5_1" else torch.empty(0)
    return q.reshape(out, -1).view(torch.uint8), _per16(d), _per16(mins)


def _split_k_quants(blocks: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K-quant super-blocks -> the kernels' layout (gguf_blocks.h), each value as the gguf package dequantizes
    it: every scale (and min) is an fp16 times a small integer, exact in float32, and so is each weight's
    scale x quant. Q4_K: nibbles in Q4_1's order per 32 weights, float32 scale and min (the negated offset) per
    32; Q5_K / Q6_K: a byte per weight, float32 scale (and min) per 16."""
    out = blocks.shape[0]
    b = blocks.view(out, -1, _K_BLOCK_BYTES[name])  # [out, super-blocks, bytes]

    def fp16(offset: int) -> torch.Tensor:
        return b[..., offset : offset + 2].contiguous().view(torch.float16).float()  # [out, sb, 1]

    if name == "Q6_K":
        ql = ((b[..., :128].reshape(out, -1, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 1, 2, 1))
              & 0x0F).reshape(out, -1, 8, 32)
        qh = b[..., 128:192].reshape(out, -1, 2, 1, 32)
        qh = ((qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 1, 4, 1)) & 3).reshape(out, -1, 8, 32)
        q = (ql | (qh << 4)).to(torch.int8) - 32
        scales = fp16(208) * b[..., 192:208].contiguous().view(torch.int8).float()  # [out, sb, 16]
        return q.reshape(out, -1).view(torch.uint8), scales.reshape(out, -1), torch.empty(0)
    d, dmin = fp16(0), fp16(2)
    sc, m = _k_scales_mins(b[..., 4:16])
    scales, mins = d * sc, -(dmin * m)  # [out, sb, 8]: per 32 weights
    if name == "Q4_K":
        q = _nibbles(b[..., 16:144], out)  # [out, sb, 8, 32]
        packed = q[..., :16] | (q[..., 16:] << 4)  # Q4_1's order: low nibbles are weights 0..15
        return packed.reshape(out, -1).contiguous(), scales.reshape(out, -1), mins.reshape(out, -1)
    qh = b[..., 16:48].reshape(out, -1, 1, 32)
    qh = ((qh >> torch.arange(8, dtype=torch.uint8).view(1, 1, 8, 1)) & 1).reshape(out, -1, 8, 32)
    q = _nibbles(b[..., 48:176], out) | (qh << 4)
    return q.reshape(out, -1).contiguous(), _per16(scales), _per16(mins)


def interleave_q4_rows(
    quants: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split Q4 blocks -> the layout gguf_linear_q8 multiplies `group` (8, or 16 on AVX-512) rows at a time: quants
    [out / group, blocks, 16 group], where for each group of rows and block, vector t (4 group bytes) holds in
    its low nibbles quad 2t and in its high nibbles quad 2t + 1, and quad k's 4-byte lane i is row
    (group g + i)'s weights 4k..4k+3; scales and mins [out / group, blocks, group] (or s per block: [.., s group]),
    row-minor likewise."""
    out, nb = quants.shape[0], quants.shape[1] // 16
    q = quants.view(out, nb, 16)
    weights = torch.cat([q & 0x0F, q >> 4], dim=2)  # [out, nb, 32]: a block's low nibbles are weights 0..15
    quads = weights.view(out // group, group, nb, 8, 4).permute(0, 2, 3, 1, 4)  # [group, block, quad, row, 4]
    packed = quads[:, :, 0::2] | (quads[:, :, 1::2] << 4)  # [group, block, 4, row, 4]

    def by_group(t: torch.Tensor) -> torch.Tensor:  # [out, nb s] -> [out / group, nb, s group]
        t = t.view(out // group, group, nb, -1).permute(0, 2, 3, 1)
        return t.reshape(out // group, nb, -1).contiguous() if t.numel() else t

    return packed.reshape(out // group, nb, 16 * group).contiguous(), by_group(scales), by_group(mins)


def _unsigned_quants(split: tuple[torch.Tensor, torch.Tensor, torch.Tensor], qtype: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The byte form of Q5_0 / Q5_1 / Q5_K / Q6_K -> its quants unsigned, [out, blocks, 32] (Q5_0's 0..31 offset by
    16, Q6_K's 0..63 by 32), with the 5-bit types' scales and mins per 32 weights (fp16 for Q5_0 / Q5_1: the file's
    own values, exact), Q6_K's as they are (per 16)."""
    quants, scales, mins = split
    name, out = GGUF_KERNEL_TYPES[qtype], quants.shape[0]
    q = (quants.view(torch.int8).view(out, -1, 32).to(torch.int16) + _QUANT_OFFSETS.get(name, 0)).to(torch.uint8)
    if name != "Q6_K":  # the byte form's values per 16 are per 32: one of each pair
        scales, mins = (t[:, ::2].contiguous() if t.numel() else t for t in (scales, mins))
        if name in ("Q5_0", "Q5_1"):
            scales, mins = (t.half().view(torch.int16) if t.numel() else t for t in (scales, mins))
    return q, scales, mins


def high_bit_rows(split: tuple[torch.Tensor, torch.Tensor, torch.Tensor], qtype: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The byte form of Q5_0 / Q5_1 / Q5_K -> rows at the file's 5 bits a weight, as gguf_linear takes them on AVX-512
    (HighBitRows in gguf_blocks.h): quants [out, blocks * 20], per block 16 bytes of low nibbles in Q4_1's order, then
    4 bytes whose bit i is weight i's fifth (quants 0..31, Q5_0's offset by 16); scales and mins [out, blocks] per 32
    weights, fp16 for Q5_0 / Q5_1 (the file's own), float32 for Q5_K. 0.69-0.875 bytes a weight, where the byte form
    takes 1.25-1.5."""
    q, scales, mins = _unsigned_quants(split, qtype)
    out, nb = q.shape[:2]
    low = q & 0x0F
    nibbles = low[..., :16] | (low[..., 16:] << 4)  # Q4_1's order: low nibbles are weights 0..15
    fifth = ((q >> 4).view(out, nb, 4, 8) << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    return torch.cat([nibbles, fifth], dim=-1).reshape(out, nb * 20).contiguous(), scales, mins


def is_high_bit_rows(split: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> bool:
    """Whether split 5-bit blocks are in `high_bit_rows`'s layout (20 bytes and a scale per 32 weights; the byte form
    has 32 bytes and two scales)."""
    quants, scales, _ = split
    return quants.dim() == 2 and quants.shape[1] == 20 * scales.shape[-1]


def interleave_high_bit_rows(split: tuple[torch.Tensor, torch.Tensor, torch.Tensor], qtype: int, group: int = 8
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The byte form (split_gguf_blocks) of Q5_0 / Q5_1 / Q5_K / Q6_K -> the layout gguf_linear_q8 multiplies `group`
    rows at a time, at the file's 5 or 6 bits a weight where the byte form takes 8: quants [out / group, blocks,
    (16 + 4 p) group], per group and block the low nibbles of q (Q5_0 0..31 offset by 16, Q6_K 0..63 offset by 32, the
    others 0..31 with mins) interleaved as interleave_q4_rows lays them out, then p planes (one for 5 bits, two for 6)
    of the bits above: bits p k..p k + p - 1 of byte j of plane i being those of the weight whose low bits are byte j
    of quad 8 i / p + k. Scales and mins [out / group, blocks, group] per 32 weights (Q6_K: [.., 2 group], per 16),
    fp16 for Q5_0 / Q5_1 (the file's own), else float32."""
    q, scales, mins = _unsigned_quants(split, qtype)
    (out, nb), bits = q.shape[:2], 2 if GGUF_KERNEL_TYPES[qtype] == "Q6_K" else 1
    low = q & 0x0F
    packed = low[..., :16] | (low[..., 16:] << 4)  # Q4_1's order: low nibbles are weights 0..15
    nibbles, scales, mins = interleave_q4_rows(packed.reshape(out, nb * 16), scales, mins, group)
    quads = (q >> 4).view(out // group, group, nb, bits, 8 // bits, 4).permute(0, 2, 3, 4, 1, 5)  # [.., i, k, row, 4]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8).view(1, 1, 1, 8 // bits, 1, 1)
    planes = (quads << shifts).sum(dim=3, dtype=torch.uint8).reshape(out // group, nb, 4 * bits * group)
    return torch.cat([nibbles, planes], dim=-1), scales, mins


def interleave_byte_rows(quants: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group: int = 16
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split Q8_0 blocks -> the layout gguf_linear_q8 multiplies `group` rows at a time: quants [out / group, blocks,
    32 group (+ 2 group)]: for each group of rows and block, vector k (4 group bytes) holds quad k (weights 4k..4k+3) of
    each of its rows, lane i being row group x g + i; by 16 (AVX-512 VNNI) then each row's sum of quants (int16), which
    that kernel's offset x takes back (AVX2's, by 8, moves the weights' signs onto x instead); fp16 scales
    [out / group, blocks, group], row-minor."""
    out, nb = quants.shape[0], quants.shape[1] // 32
    q = quants.view(torch.int8).view(out // group, group, nb, 8, 4)
    packed = q.permute(0, 2, 3, 1, 4).reshape(out // group, nb, 32 * group).view(torch.uint8)

    def by_group(t: torch.Tensor) -> torch.Tensor:  # [out, nb] -> [out / group, nb, group]
        return t.view(out // group, group, nb).transpose(1, 2).contiguous()

    if group != 16:
        return packed, by_group(scales), mins
    sums = q.sum((-2, -1), dtype=torch.int32).to(torch.int16).transpose(1, 2)  # [out / 16, nb, 16]
    return torch.cat([packed, sums.contiguous().view(torch.uint8)], dim=-1), by_group(scales), mins


def row_blocks(split: tuple[torch.Tensor, torch.Tensor, torch.Tensor], qtype: int, ids: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows `ids` of split blocks in the row layout (`dequantized` takes it), from the row layout or an interleaved
    one (`interleave_q4_rows`, `interleave_high_bit_rows`, `interleave_byte_rows`): an embedding lookup."""
    quants, scales, mins = split
    if quants.dim() == 2:
        return tuple(t[ids] if t.numel() else t for t in split)
    groups, nb = quants.shape[:2]
    if GGUF_KERNEL_TYPES[qtype] == "Q8_0":  # rows by 8 or 16 (interleave_byte_rows)
        group = scales.shape[-1]
        g, lane = ids // group, ids % group
        rows = quants[..., : 32 * group].reshape(groups, nb, 8, group, 4)[g, :, :, lane]  # [ids, blocks, quad, 4]
        return rows.reshape(len(ids), nb * 32), scales[g, :, lane], mins
    name = GGUF_KERNEL_TYPES[qtype]
    bits = 2 if name == "Q6_K" else 1 if qtype in HIGH_BIT_TYPES else 0  # planes beyond the nibbles
    group = quants.shape[2] // (16 + 4 * bits)
    g, lane = ids // group, ids % group
    packed = quants[..., : 16 * group].reshape(groups, nb, 4, group, 4)[g, :, :, lane]  # [ids, blocks, t, 4]
    weights = torch.stack([packed & 0x0F, packed >> 4], dim=-2).reshape(len(ids), nb, 32)  # (quads 2t and 2t + 1)
    if bits:  # + the high bits: the byte form (split_gguf_blocks)
        planes = quants[..., 16 * group :].reshape(groups, nb, bits, group, 4)[g, :, :, lane]  # [ids, blocks, i, 4]
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8).view(8 // bits, 1)
        high = (planes.unsqueeze(-2) >> shifts) & ((1 << bits) - 1)  # [ids, blocks, i, k, 4]: quad 8 i / bits + k
        q = (weights | (high.reshape(len(ids), nb, 32) << 4)).to(torch.int16) - _QUANT_OFFSETS.get(name, 0)
        lane_scales, lane_mins = (t.view(groups, nb, -1, group)[g, :, :, lane].reshape(len(ids), -1) if t.numel()
                                  else t for t in (scales, mins))
        if bits == 1:  # per 32 -> the byte form's float32 per 16
            lane_scales, lane_mins = (_per16(t.view(torch.float16).float() if t.dtype == torch.int16 else t)
                                      for t in (lane_scales, lane_mins))
        return q.to(torch.int8).view(torch.uint8).reshape(len(ids), -1), lane_scales, lane_mins
    rows = weights[..., :16] | (weights[..., 16:] << 4)  # Q4_1's order: low nibbles are weights 0..15
    return rows.reshape(len(ids), nb * 16), scales[g, :, lane], mins[g, :, lane] if mins.numel() else mins


def dequantized(split: tuple[torch.Tensor, torch.Tensor, torch.Tensor], qtype: int) -> torch.Tensor:
    """Float32 values of blocks, for one call: by the compiled kernel where one serves, else dequantize_blocks."""
    kernel = kernels().gguf_dequantize()
    return kernel(*split, qtype) if kernel is not None else dequantize_blocks(split, qtype)


def gguf_linear(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    table = kernels()
    kernel = table.gguf_matmul(layer, x.shape[0])
    if kernel is None:  # the dense weight, or the blocks' values for this call (a GEMM beats the block kernels)
        if (half_linear := table.rounded_half_linear(layer, x.shape[0])) is not None:
            return half_linear(layer.bf16_packed, x, bias)
        weight = layer.weight if layer.weight.numel() else _side_by_side([dequantized(*p) for p in layer.gguf_parts], 0)
        weight = weight.to(x.dtype)
        return table.dense_linear(x, weight)(x, weight, bias)
    y = _side_by_side([kernel(x, *split, qtype) for split, qtype in layer.gguf_parts], -1)
    return y if bias is None else y + bias


def _side_by_side(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """A fused layer's parts joined (no copy for a layer of one part, the usual case)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _shard(t: torch.Tensor, dim: int, size: int, rank: int) -> torch.Tensor:
    return t.narrow(dim, rank * size, size)


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp_dim: int | None) -> None:
        super().__init__()
        self.tp_dim = tp_dim
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if self.tp_dim is not None and (self.tp_dim == 0 or param.dim() > 1):
            size = param.shape[self.tp_dim]
            loaded = _shard(loaded, self.tp_dim, size, tp_rank())
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gguf_linear(self, x, self.bias)


class ReplicatedLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias, None)


class ColumnParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        assert out_features % tp_size() == 0
        super().__init__(in_features, out_features // tp_size(), bias, 0)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (gate and up)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        n = tp_size()
        offset = sum(self.out_sizes[:shard_id]) // n
        size = self.out_sizes[shard_id] // n
        param.data.narrow(0, offset, size).copy_(_shard(loaded, 0, size, tp_rank()))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused. With more ranks than KV heads, KV heads are replicated so
    that every rank holds the KV head its query heads attend to."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool) -> None:
        n = tp_size()
        self.head_dim = head_dim
        self.num_heads = num_heads // n
        self.num_kv_heads = max(1, num_kv_heads // n)
        self.kv_replicas = max(1, n // num_kv_heads)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * n
        super().__init__(hidden, out, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str = "q") -> None:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, rank = 0, q_size, tp_rank()
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, rank = kv_size, tp_rank() // self.kv_replicas
        param.data.narrow(0, offset, size).copy_(_shard(loaded, 0, size, rank))


class RowParallelLinear(LinearBase):
    """Input dimension sharded; partial products are summed across ranks. The bias is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        assert in_features % tp_size() == 0
        super().__init__(in_features // tp_size(), out_features, bias, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = gguf_linear(self, x, self.bias if tp_rank() == 0 else None)
        return all_reduce(y)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        n = tp_size()
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // n)
        self.start = tp_rank() * self.shard_size
        self.weight = nn.Parameter(torch.zeros(self.shard_size, dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        part = loaded[self.start : self.start + self.shard_size]
        param.data[: part.shape[0]].copy_(part)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.weight.numel():  # GGUF blocks only (one rank): the rows looked up, dequantized
            (split, qtype), = self.gguf_parts  # (an embedding's blocks are one tensor's)
            return dequantized(row_blocks(split, qtype, ids.flatten()), qtype).view(*ids.shape, -1)
        if tp_size() == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        valid = (local >= 0) & (local < self.shard_size)
        y = F.embedding(local.clamp(0, self.shard_size - 1), self.weight) * valid.unsqueeze(-1)
        return all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = gather_last_dim(gguf_linear(self, x, None))
        return logits[..., : self.vocab_size]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`, (norm(x + residual), x + residual), the sum written into
        `residual` where the fused kernel runs."""
        if residual is None:
            if (rms_norm := kernels().elementwise("rms_norm", x)) is None:
                return self._norm(x)
            return rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
        if (add_rms_norm_ := kernels().elementwise("add_rms_norm_", x)) is None:
            residual = residual + x
            return self._norm(residual), residual
        return add_rms_norm_(x, residual, self.weight, self.eps), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics as transformers does, whatever the activation dtype.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding from a precomputed cos/sin table. `interleaved` rotates adjacent
    pairs (GPT-J style, ERNIE); otherwise the two halves of the head (GPT-NeoX style, Llama)."""

    def __init__(self, inv_freq: torch.Tensor, max_positions: int, scaling: float, interleaved: bool) -> None:
        super().__init__()
        self.interleaved = interleaved
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.to(t.device, torch.float32))  # (t on the model's device, inv_freq on the CPU)
        self.register_buffer("cos", freqs.cos() * scaling, persistent=False)
        self.register_buffer("sin", freqs.sin() * scaling, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        if (rotary_ := kernels().elementwise("rotary_", q)) is not None:
            rotary_(q, k, positions, self.cos, self.sin, self.interleaved)
            return q, k
        cos = self.cos[positions].unsqueeze(-2)  # [T, 1, rot/2]
        sin = self.sin[positions].unsqueeze(-2)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        else:
            x1, x2 = x.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(dtype)
