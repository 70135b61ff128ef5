"""Attention metadata for one forward pass, set by the model runner and read by the attention
layers, so model code never sees batch plumbing.

The flat token batch is ordered: decode tokens first (one query each), then prefill chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    start: int  # offset of the chunk's first token in the flat batch
    length: int  # query tokens in this chunk
    context_len: int  # tokens visible to the chunk's last query (cached + new)
    block_table: torch.Tensor | None  # [blocks] the sequence's cache blocks up to context_len (None: no cache)
    query_lens: torch.Tensor | None = None  # [length] tokens each query attends to (its position + 1)

    @property
    def fresh(self) -> bool:
        """No earlier context: the chunk attends to its own keys only."""
        return self.context_len == self.length


@dataclass
class AttentionContext:
    slot_mapping: torch.Tensor  # [num_tokens] cache slot each new key/value is written to
    num_decode: int = 0
    decode_block_tables: torch.Tensor | None = None  # [num_decode, max_blocks]
    decode_lens: torch.Tensor | None = None  # [num_decode] context length of each decode token
    decode_mask: torch.Tensor | None = None  # [num_decode, 1, 1, max_blocks * block_size] bool
    prefills: list[PrefillChunk] = field(default_factory=list)

    @cached_property
    def query_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every query row's block table [T, max_blocks] (padded with block 0) and context length [T], decode rows
        then each prompt chunk's (its rows share its table and attend to their own position + 1): the whole step in
        one paged-attention call (asked only where the kernel reads a bound cache, so every chunk has a table)."""
        if not self.prefills:
            return self.decode_block_tables, self.decode_lens
        parts = [(chunk.block_table.unsqueeze(0).expand(chunk.length, -1), chunk.query_lens) for chunk in self.prefills]
        if self.num_decode:
            parts.insert(0, (self.decode_block_tables, self.decode_lens))
        width = max(table.shape[1] for table, _ in parts)
        return torch.cat([F.pad(table, (0, width - table.shape[1])) for table, _ in parts]), \
            torch.cat([lens for _, lens in parts])


_context: AttentionContext | None = None


def set_context(ctx: AttentionContext | None) -> None:
    global _context
    _context = ctx


def get_context() -> AttentionContext:
    assert _context is not None, "attention called outside a model-runner step"
    return _context
