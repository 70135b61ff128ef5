"""Owns the model and its KV cache; turns a scheduled batch into sampled tokens.

With tensor parallelism every rank has a ModelRunner holding its shard. Rank 0 prepares each
step, broadcasts it as a StepInput, runs its share and samples; the other ranks sit in
`worker_loop`, running whatever rank 0 sends until it sends the stop signal.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.distributed as dist

from slipstream.config import EngineConfig
from slipstream.engine.scheduler import ScheduledSeq
from slipstream.engine.sequence import TokenLogprobs
from slipstream.kernels import KernelTable, kernels
from slipstream.model import kv_cache
from slipstream.model.context import set_context
from slipstream.model.huge_pages import move_weights_to_huge_pages
from slipstream.model.layers import (
    VocabParallelEmbedding,
    hold_half_precision_weights,
    keep_half_precision_weights,
    round_activations_to_bf16,
    round_weights,
)
from slipstream.model.loader import checkpoint_tensor_types, half_precision_checkpoint, iter_gguf_blocks, iter_weights
from slipstream.model.parallel import all_reduce_min, tp_rank, tp_size
from slipstream.model.registry import build_model
from slipstream.model.sampler import Sampler, accepted_draft, token_logprobs
from slipstream.model.step_input import HEADER_LEN, StepInput

logger = logging.getLogger(__name__)

# --quantization wint8 / wint4: the GGUF block type each linear layer's weights are rounded to at load.
WEIGHT_ONLY_TYPES = {"wint8": 8, "wint4": 3}  # Q8_0; Q4_1 (a scale and a minimum per 32 weights)

_STOP = torch.zeros(HEADER_LEN, dtype=torch.long)
PromptRows = tuple[ScheduledSeq, int]  # a sequence and how many of its prompt positions get logprobs


def weights_report(model: torch.nn.Module, model_dir, table: KernelTable) -> str:
    """One line on the weights as loaded: the checkpoint's tensor types, the resident bytes (dense parameters
    plus GGUF blocks, and --dtype bfloat16's packed copies) and what serves the block matmuls."""
    blocks = [m for m in model.modules() if getattr(m, "gguf_parts", None) is not None]
    # (a tied embedding and LM head share theirs)
    tensors = {id(t): t for m in blocks for split, _ in m.gguf_parts for t in split}
    tensors |= {id(m.bf16_packed): m.bf16_packed for m in blocks if getattr(m, "bf16_packed", None) is not None}
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    resident += sum(t.numel() * t.element_size() for t in tensors.values())
    served: Counter[str] = Counter()
    for lin in blocks:
        if type(lin) is VocabParallelEmbedding:  # (a lookup, not a matmul)
            continue
        kernel = table.gguf_matmul(lin, 1)
        kind = getattr(kernel, "__name__", "dense") if kernel is not None else "dense (no kernel)"
        served[f"{lin.gguf_label} by {kind}"] += 1
    types = ", ".join(f"{t} x {n}" for t, n in checkpoint_tensor_types(model_dir).most_common())
    serving = ", ".join(f"{k} x {n}" for k, n in served.most_common()) or "none: dense weights only"
    variant = f" ({table.variant.name})" if table.variant is not None else ""
    return f"weights: {types}; resident {resident / 2**20:.0f} MiB; block matmuls{variant}: {serving}"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: float32 on every device, the exact mode (outputs equal to the reference, token for token) and the
    type the compiled CPU kernels serve; bfloat16 is a choice (`--dtype bfloat16`), faster on CUDA, rounded."""
    if dtype == "auto":
        return torch.float32
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
             "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, bfloat16, float16 or float32")
    return names[dtype]


def trained_context(hf_config) -> int:
    return getattr(hf_config, "max_position_embeddings", None) or 2048


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 4 << 30


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, model_dir, max_model_len: int,
                 sampler: Sampler | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and tp_size() > 1:
            self.device = torch.device("cuda", tp_rank() % torch.cuda.device_count())
        self.dtype = resolve_dtype(config.dtype, self.device)  # the activations'
        quant = config.quantization
        table = kernels()
        if quant is not None and self.device.type == "cpu" and self.dtype != torch.float32:
            logger.warning("--quantization %s computes in float32 around its quantized weights: --dtype %s ignored",
                           quant, config.dtype)
            self.dtype = torch.float32
        self.weight_dtype = self.dtype  # the weights' values: rounded to it
        if table.serves_half_weights(self.device, self.dtype, tp_size()):
            self.dtype = torch.float32
        self.block_size = config.block_size
        self.sampler = sampler
        torch.manual_seed(config.seed)
        self.model = build_model(hf_config, self.dtype, self.device, max_model_len)
        int8, weight_only = quant == "w4a8", quant in WEIGHT_ONLY_TYPES
        if weight_only and (self.device.type != "cpu" or tp_size() > 1):
            logger.warning("--quantization %s applies on a CPU with one tensor-parallel rank: serving exact mode",
                           quant)
            weight_only = False
        if int8 and table.ops is not None and not table.has("gguf_linear_q8"):
            logger.warning("--quantization w4a8: its kernel failed its self-check on this CPU; serving exact mode")
            int8 = False
        blocks = []
        if table.serves_gguf_blocks(self.device, self.dtype, tp_size(), int8):
            blocks = list(iter_gguf_blocks(model_dir))  # only a converted GGUF has them
        if int8 and not table.serves_gguf_blocks(self.device, self.dtype, tp_size(), True):
            lacking = [what for what, lacks in (
                (f"a CPU (the device is {self.device})", self.device.type != "cpu"),
                (f"one tensor-parallel rank (not {tp_size()})", tp_size() > 1),
                ("the compiled CPU kernels (none here: no AVX2, no compiler, or SLIPSTREAM_CPU_ISA=none)",
                 table.ops is None)) if lacks]
            raise ValueError(f"--quantization w4a8 needs {' and '.join(lacking) or 'its int8 block kernel'}")
        # A checkpoint without blocks (safetensors): its linear layers rounded to Q4_1 at load, as wint4 rounds them.
        rounds_to_q4 = int8 and not blocks
        exact_kernels = not int8 and table.serves_gguf_blocks(self.device, self.dtype, tp_size(), False)
        served: set[str] = set()  # checkpoint tensors that GGUF blocks serve: never read as float32
        if blocks:  # (first: the layers they serve are then never filled with float32 weights)
            served = self.model.load_gguf_blocks(blocks, int8_activations=int8)
        elif exact_kernels and not weight_only and self.weight_dtype == self.dtype and \
                (half := half_precision_checkpoint(model_dir)) is not None:
            hold_half_precision_weights(self.model, half)
        del blocks
        self.model.load_weights(iter_weights(model_dir, skip=served))
        rounded = 0
        if weight_only or rounds_to_q4:
            rounded = self.model.quantize_linear_layers(WEIGHT_ONLY_TYPES["wint4" if rounds_to_q4 else quant], int8)
        if weight_only and not rounded:
            logger.info("--quantization %s: the model's linear layers are quantized GGUF blocks already: served as "
                        "they are", quant)
        self.quantization = "w4a8" if int8 else quant if rounded else None  # what was applied (/version says it)
        if self.weight_dtype != self.dtype:
            round_weights(self.model, self.weight_dtype)
        if exact_kernels:
            # (a bf16 / fp16 checkpoint's weights, as they are, or those round_weights rounded)
            keep_half_precision_weights(self.model, rounded=self.weight_dtype != self.dtype)
            if self.weight_dtype == torch.bfloat16:
                round_activations_to_bf16(self.model)
        if self.device.type == "cpu":
            move_weights_to_huge_pages(self.model)
        logger.info("%s", weights_report(self.model, model_dir, table))
        self.num_blocks = self._allocate_kv_cache(max_model_len)

    def _kv_cache_dtype(self) -> torch.dtype:
        if self.config.kv_cache_dtype == "int8":
            return torch.int8
        if self.config.kv_cache_dtype != "auto":
            return resolve_dtype(self.config.kv_cache_dtype, self.device)
        # w4a8 computes as llama.cpp does, which keeps its KV cache in float16: half the bytes that
        # decode attention reads, its cost at large batches; so do half-precision weights (the kernels' cache types
        # are float32 and float16).
        half = self.config.quantization == "w4a8" or self.weight_dtype != self.dtype
        return torch.float16 if half else self.dtype

    def numerics(self) -> str:
        """The model's number types, as the load log says them."""
        if self.weight_dtype != self.dtype:
            return f"{str(self.weight_dtype).removeprefix('torch.')} weights, float32 activations"
        return str(self.dtype).removeprefix("torch.")

    def _allocate_kv_cache(self, max_model_len: int) -> int:
        layers = self.model.attention_layers()
        a = layers[0]
        kv_dtype = self._kv_cache_dtype()
        elem = torch.tensor([], dtype=kv_dtype).element_size()
        row = kv_cache.row_width(a.head_dim, kv_dtype)
        block_bytes = 2 * len(layers) * self.block_size * a.num_kv_heads * row * elem
        budget = self.config.kv_cache_memory
        if budget is None:
            budget = int(available_memory(self.device) * self.config.kv_cache_fraction / tp_size())
        # No point in more blocks than every sequence slot filled to the context length needs.
        useful = self.config.max_num_seqs * -(-max_model_len // self.block_size) + 1
        num_blocks = all_reduce_min(min(budget // block_bytes, useful))
        if num_blocks < 2:
            raise ValueError(f"KV cache budget of {budget} bytes holds fewer than 2 blocks of {block_bytes} bytes")
        kv = torch.empty(2, len(layers), num_blocks, a.num_kv_heads, self.block_size, row, dtype=kv_dtype,
                         device=self.device)  # (the layout: model/kv_cache.py)
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = kv[0, i], kv[1, i]
        self.kv_cache = kv
        self.kv_cache_bytes = kv.numel() * elem
        table = kernels()
        if self.device.type == "cpu" and table.has("paged_attention") and not table.cache_fits(kv[0, 0]):
            logger.warning("a %s KV cache: no compiled attention kernel takes it (float32, float16 and int8 ones; "
                           "float16 is as small): decode attention runs in plain PyTorch, about half as fast",
                           str(kv_dtype).removeprefix("torch."))
        return num_blocks

    def prepare(self, batch: list[ScheduledSeq]) -> tuple[list[ScheduledSeq], list[PromptRows], StepInput]:
        """Flatten the batch (decode tokens first, then prefill chunks: a decode with guessed tokens is one, its
        rows causal) into a StepInput. Also returns the sequences that sample this step (each with a logits row for
        its last known token and one for each guess) and the (sequence, row count) of prompt-logprob rows, in the
        order of their logits rows."""
        bs = self.block_size
        decodes = [s for s in batch if s.num_new_tokens == 1]
        prefills = [s for s in batch if s.num_new_tokens > 1]
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_idx: list[int] = []
        sampling: list[ScheduledSeq] = []
        prompt_idx: list[int] = []
        prompt_rows: list[PromptRows] = []
        prefill_meta: list[list[int]] = []
        for s in decodes + prefills:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_new_tokens
            if s.num_new_tokens > 1:
                prefill_meta.append([len(ids), s.num_new_tokens, start])
            # Logits at position p score prompt token p + 1 (the last prompt position samples instead);
            # positions scored before a preemption are not scored again.
            first = max(start, len(seq.prompt_logprobs))
            if seq.params.prompt_logprobs is not None and first < min(end, seq.num_prompt_tokens - 1):
                n = min(end, seq.num_prompt_tokens - 1) - first
                prompt_idx.extend(range(len(ids) + first - start, len(ids) + first - start + n))
                prompt_rows.append((s, n))
            ids.extend(seq.token_ids[start:end] + s.draft)
            bt = seq.block_table
            positions.extend(range(start, end))
            slots.extend(bt[p // bs] * bs + p % bs for p in range(start, end))
            if s.samples:
                sample_idx.extend(range(len(ids) - 1 - len(s.draft), len(ids)))
                sampling.append(s)

        def table(rows: list[list[int]]) -> torch.Tensor:
            width = max((len(r) for r in rows), default=0)
            return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long).view(len(rows), width)

        step = StepInput(
            input_ids=torch.tensor(ids, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            decode_block_tables=table([s.seq.block_table for s in decodes]),
            decode_lens=torch.tensor([s.seq.num_computed_tokens + 1 for s in decodes], dtype=torch.long),
            prefill_meta=torch.tensor(prefill_meta, dtype=torch.long).view(len(prefills), 3),
            prefill_block_tables=table([s.seq.block_table for s in prefills]),
            logits_idx=torch.tensor(sample_idx + prompt_idx, dtype=torch.long),
        )
        return sampling, prompt_rows, step

    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor | None:
        """Forward one step on this rank; returns float32 logits of the rows in `logits_idx`."""
        step = StepInput(*(getattr(step, f).to(self.device) for f in step.__dataclass_fields__))
        set_context(step.attention_context(self.block_size))
        try:
            hidden = self.model(step.input_ids, step.positions)
        finally:
            set_context(None)
        if not len(step.logits_idx):
            return None
        return self.model.logits(hidden[step.logits_idx])

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> list[tuple[ScheduledSeq, list[int], list[TokenLogprobs | None]]]:
        """Forward the batch; returns (scheduled seq, new tokens, their logprobs) for each sequence whose chunk
        reached the end of its known tokens: the sampled token, after as many of its guesses as the model agrees
        with (`accepted_draft`). Prompt logprobs go onto the sequences."""
        sampling, prompt_rows, step = self.prepare(batch)
        if tp_size() > 1:
            header, payload = step.pack()
            dist.broadcast(header, 0)
            dist.broadcast(payload, 0)
        logits = self.execute(step)
        if logits is None:
            return []
        row = rows = sum(1 + len(s.draft) for s in sampling)  # the sampled rows; prompt-logprob rows after them
        for s, n in prompt_rows:
            seq = s.seq
            first = len(seq.prompt_logprobs)
            targets = seq.token_ids[first + 1 : first + 1 + n]
            seq.prompt_logprobs += token_logprobs(logits[row : row + n], targets, seq.params.prompt_logprobs)
            row += n
        if not sampling:
            return []
        tokens, logprobs = self.sampler(logits[:rows], [s.seq for s in sampling for _ in range(1 + len(s.draft))],
                                        [g for s in sampling for g in (*s.draft, None)])
        results, row = [], 0
        for s in sampling:
            n = 1 + accepted_draft(s.draft, tokens[row : row + len(s.draft)])
            results.append((s, tokens[row : row + n], logprobs[row : row + n]))
            row += 1 + len(s.draft)
        return results

    def worker_loop(self) -> None:
        """Ranks > 0: run the steps rank 0 broadcasts until it says stop."""
        header = torch.empty(HEADER_LEN, dtype=torch.long)
        while True:
            dist.broadcast(header, 0)
            if header[0].item() == 0:
                return
            payload = torch.empty(StepInput.payload_len(header), dtype=torch.long)
            dist.broadcast(payload, 0)
            self.execute(StepInput.unpack(header, payload, self.device))

    def stop_workers(self) -> None:
        if tp_size() > 1 and tp_rank() == 0:
            dist.broadcast(_STOP.clone(), 0)
