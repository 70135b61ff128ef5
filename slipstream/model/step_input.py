"""Everything a forward pass needs, as a handful of integer tensors.

Rank 0 builds it from the scheduled batch; with tensor parallelism it travels to the other ranks
as one flat int64 tensor (two broadcasts: sizes, then payload), and every rank derives the same
attention context from it. Nothing about sequences or sampling leaves rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from slipstream.model.context import AttentionContext, PrefillChunk

HEADER_LEN = 8


@dataclass
class StepInput:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T]
    decode_block_tables: torch.Tensor  # [D, W] (rows padded with block 0, masked out)
    decode_lens: torch.Tensor  # [D] context length of each decode token
    prefill_meta: torch.Tensor  # [P, 3] (start, length, tokens already computed)
    prefill_block_tables: torch.Tensor  # [P, W2]
    logits_idx: torch.Tensor  # [S] rows whose logits are needed: sampled rows, then prompt-logprob rows

    def pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(header, payload): header holds the shapes so receivers can size their buffers."""
        tensors = [getattr(self, f.name) for f in fields(self)]
        t, (d, w), (p, w2), s = len(self.input_ids), self.decode_block_tables.shape, \
            self.prefill_block_tables.shape, len(self.logits_idx)
        header = torch.tensor([1, t, d, w, p, w2, s, 0], dtype=torch.long)
        return header, torch.cat([x.reshape(-1).long().cpu() for x in tensors])

    @classmethod
    def unpack(cls, header: torch.Tensor, payload: torch.Tensor, device: torch.device) -> StepInput:
        _, t, d, w, p, w2, s, _ = header.tolist()
        shapes = [(t,), (t,), (t,), (d, w), (d,), (p, 3), (p, w2), (s,)]
        parts, offset = [], 0
        for shape in shapes:
            n = 1
            for x in shape:
                n *= x
            parts.append(payload[offset : offset + n].view(shape).to(device))
            offset += n
        return cls(*parts)

    @staticmethod
    def payload_len(header: torch.Tensor) -> int:
        _, t, d, w, p, w2, s, _ = header.tolist()
        return 3 * t + d * w + d + 3 * p + p * w2 + s

    def attention_context(self, block_size: int) -> AttentionContext:
        dev = self.input_ids.device
        ctx = AttentionContext(slot_mapping=self.slot_mapping)
        d = len(self.decode_lens)
        if d:
            ctx.num_decode = d
            ctx.decode_block_tables = self.decode_block_tables
            ctx.decode_lens = self.decode_lens
            width = self.decode_block_tables.shape[1] * block_size
            mask = torch.arange(width, device=dev).unsqueeze(0) < self.decode_lens.unsqueeze(1)
            ctx.decode_mask = mask.view(d, 1, 1, width)
        for (start, n, computed), table in zip(self.prefill_meta.tolist(), self.prefill_block_tables, strict=True):
            total = computed + n
            ctx.prefills.append(PrefillChunk(start, n, total, table[: -(-total // block_size)],
                                             torch.arange(computed + 1, total + 1, device=dev)))
        return ctx
