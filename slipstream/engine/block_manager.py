"""The one owner of every KV-cache block: allocation, reference counts and the prefix cache.

A block is identified by its index into the model runner's KV tensors. Full blocks are
content-addressed by a hash chained over all tokens up to and including the block, so two
sequences with the same prefix share physical blocks. Freed blocks keep their hash and stay
findable until they are reused (LRU order), which is what makes prefix caching cheap.

The hash is SHA-256, not Python's `hash`: that one is predictable for ints, so a client could craft
a prompt whose blocks collide with another client's and be served (or poison) their cache.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from slipstream.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block id
        # Unreferenced blocks, least recently freed first; may still hold cached content.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_cached_free = 0  # free blocks that still hold cached content (reusable by a prefix hit)
        self.prefix_queries = 0  # tokens of admitted sequences looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def _chain_hash(self, parent: bytes | None, tokens: list[int]) -> bytes:
        return hashlib.sha256((parent or b"") + array("q", tokens).tobytes()).digest()

    def lookup_prefix(self, seq: Sequence) -> list[int]:
        """Blocks that already hold a prefix of `seq` (full blocks only; at least one token is left
        to compute so the sequence still produces logits). Pass them to `allocate` to use them."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        hits: list[int] = []
        parent = None
        seq.block_hashes = []
        for i in range((seq.num_tokens - 1) // bs):
            h = self._chain_hash(parent, seq.token_ids[i * bs : (i + 1) * bs])
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
            seq.block_hashes.append(h)
            parent = h
        return hits

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix_blocks: list[int] | None = None) -> bool:
        """Make `seq`'s block table cover its computed tokens plus `num_new_tokens`.
        Returns False (changing nothing) when the pool cannot supply the blocks."""
        prefix_blocks = prefix_blocks or []
        num_tokens = seq.num_computed_tokens + len(prefix_blocks) * self.block_size + num_new_tokens
        needed = -(-num_tokens // self.block_size) - len(seq.block_table) - len(prefix_blocks)
        revived = sum(1 for b in prefix_blocks if self.ref_counts[b] == 0)
        if needed + revived > len(self.free):
            return False
        for b in prefix_blocks:
            if self.ref_counts[b] == 0:
                del self.free[b]
                self.num_cached_free -= 1
            self.ref_counts[b] += 1
        if prefix_blocks:
            seq.block_table.extend(prefix_blocks)
            seq.num_hashed_blocks = len(seq.block_table)
        for _ in range(needed):
            b, _ = self.free.popitem(last=False)
            old = self.block_hash[b]
            if old is not None:
                self.num_cached_free -= 1
                if self.cached.get(old) == b:
                    del self.cached[old]
                self.block_hash[b] = None
            self.ref_counts[b] = 1
            seq.block_table.append(b)
        return True

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one prefix-cache lookup that admission used (not the retries of a sequence that had to wait)."""
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks of `seq` that became full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        parent = seq.block_hashes[seq.num_hashed_blocks - 1] if seq.num_hashed_blocks else None
        for i in range(seq.num_hashed_blocks, num_full):
            h = self._chain_hash(parent, seq.token_ids[i * bs : (i + 1) * bs])
            b = seq.block_table[i]
            if h not in self.cached:
                self.cached[h] = b
                self.block_hash[b] = h
            seq.block_hashes.append(h)
            parent = h
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, num_full)

    def free_blocks(self, seq: Sequence) -> None:
        # Tail blocks first: they are the least likely to be shared, so they are evicted first.
        for b in reversed(seq.block_table):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free[b] = None
                self.num_cached_free += self.block_hash[b] is not None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_hashed_blocks = 0
