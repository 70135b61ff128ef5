"""Owns the model and its KV cache; turns a scheduled batch into sampled tokens."""

from __future__ import annotations

import logging
import os

import torch

from slipstream.config import EngineConfig
from slipstream.engine.scheduler import ScheduledSeq
from slipstream.engine.sequence import TokenLogprobs
from slipstream.model.context import AttentionContext, PrefillChunk, set_context
from slipstream.model.llama import build_model
from slipstream.model.loader import iter_weights
from slipstream.model.sampler import Sampler

logger = logging.getLogger(__name__)


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_bf16() else torch.float32
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
             "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, bfloat16, float16 or float32")
    return names[dtype]


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 4 << 30


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, model_dir, max_model_len: int, sampler: Sampler) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.block_size = config.block_size
        self.sampler = sampler
        torch.manual_seed(config.seed)
        self.model = build_model(hf_config, self.dtype, self.device, max_model_len)
        self.model.load_weights(iter_weights(model_dir))
        self.num_blocks = self._allocate_kv_cache(max_model_len)

    def _allocate_kv_cache(self, max_model_len: int) -> int:
        layers = self.model.attention_layers()
        a = layers[0]
        elem = torch.tensor([], dtype=self.dtype).element_size()
        block_bytes = 2 * len(layers) * self.block_size * a.num_kv_heads * a.head_dim * elem
        budget = self.config.kv_cache_memory
        if budget is None:
            budget = int(available_memory(self.device) * self.config.kv_cache_fraction)
        # No point in more blocks than every sequence slot filled to the context length needs.
        useful = self.config.max_num_seqs * -(-max_model_len // self.block_size) + 1
        num_blocks = min(budget // block_bytes, useful)
        if num_blocks < 2:
            raise ValueError(f"KV cache budget of {budget} bytes holds fewer than 2 blocks of {block_bytes} bytes")
        kv = torch.empty(2, len(layers), num_blocks, self.block_size, a.num_kv_heads, a.head_dim,
                         dtype=self.dtype, device=self.device)
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = kv[0, i], kv[1, i]
        self.kv_cache = kv
        self.kv_cache_bytes = kv.numel() * elem
        return num_blocks

    def _prepare(self, batch: list[ScheduledSeq]):
        dev, bs = self.device, self.block_size
        decodes = [s for s in batch if s.num_new_tokens == 1]
        prefills = [s for s in batch if s.num_new_tokens > 1]
        order = decodes + prefills
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_idx: list[int] = []
        for s in order:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_new_tokens
            ids.extend(seq.token_ids[start:end])
            bt = seq.block_table
            for p in range(start, end):
                positions.append(p)
                slots.append(bt[p // bs] * bs + p % bs)
            if s.samples:
                sample_idx.append(len(ids) - 1)
        ctx = AttentionContext(slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev))
        if decodes:
            ctx.num_decode = len(decodes)
            width = max(len(s.seq.block_table) for s in decodes)
            tables = [s.seq.block_table + [0] * (width - len(s.seq.block_table)) for s in decodes]
            ctx.decode_block_tables = torch.tensor(tables, dtype=torch.long, device=dev)
            lens = torch.tensor([s.seq.num_computed_tokens + 1 for s in decodes], device=dev)
            mask = torch.arange(width * bs, device=dev).unsqueeze(0) < lens.unsqueeze(1)
            ctx.decode_mask = mask.view(len(decodes), 1, 1, -1)
        offset = len(decodes)
        for s in prefills:
            n, computed = s.num_new_tokens, s.seq.num_computed_tokens
            total = computed + n
            chunk = PrefillChunk(offset, n, total, None, None)
            if computed:
                nblocks = -(-total // bs)
                chunk.block_table = torch.tensor(s.seq.block_table[:nblocks], dtype=torch.long, device=dev)
                q_pos = torch.arange(n, device=dev).unsqueeze(1) + computed
                chunk.mask = torch.arange(total, device=dev).unsqueeze(0) <= q_pos
            ctx.prefills.append(chunk)
            offset += n
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        return order, input_ids, pos, ctx, torch.tensor(sample_idx, dtype=torch.long, device=dev)

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> list[tuple[ScheduledSeq, int, TokenLogprobs | None]]:
        """Forward the batch; returns (scheduled seq, sampled token, logprobs) for each sequence
        whose chunk reached the end of its known tokens."""
        order, input_ids, positions, ctx, sample_idx = self._prepare(batch)
        set_context(ctx)
        try:
            hidden = self.model(input_ids, positions)
        finally:
            set_context(None)
        sampling = [s for s in order if s.samples]
        if not sampling:
            return []
        logits = self.model.logits(hidden[sample_idx])
        tokens, logprobs = self.sampler(logits, [s.seq for s in sampling])
        return list(zip(sampling, tokens, logprobs, strict=True))


def set_cpu_threads(n: int | None = None) -> None:
    if n is None:
        n = int(os.environ.get("SLIPSTREAM_NUM_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(max(1, n))
