"""N-gram speculation's guesses ("prompt lookup", vLLM's `ngram` method): which tokens may come next in a
sequence, read from its own context.

The guess is what followed the last earlier occurrence of the context's last n tokens (n from prompt_lookup_max
down to prompt_lookup_min, the longest match first). Each sequence keeps an index of its n-grams, each mapped to
where it last ended, extended with the tokens appended since the last lookup: a lookup costs the same at 100
tokens of context as at 100,000.
"""

from __future__ import annotations

from slipstream.config import SpeculativeConfig
from slipstream.engine.sequence import Sequence


class _NgramIndex:
    def __init__(self, sizes: range) -> None:
        self.last_end: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in sizes}
        self.indexed = 0  # n-grams ending before this position are in the index

    def extend(self, tokens: list[int]) -> None:
        """Index the n-grams of `tokens` (the sequence, which only grows) that a token follows: those ending before
        its last position (the one ending there is what a lookup looks for)."""
        for end in range(self.indexed, len(tokens)):
            for n, last_end in self.last_end.items():
                if end >= n:
                    last_end[tuple(tokens[end - n : end])] = end
        self.indexed = len(tokens)


class NgramProposer:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self._sizes = range(config.prompt_lookup_max, config.prompt_lookup_min - 1, -1)
        self._indexes: dict[str, _NgramIndex] = {}

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        """Up to min(num_speculative_tokens, limit) tokens that may follow `seq`'s tokens; [] when its context
        holds no earlier occurrence of its last prompt_lookup_min tokens."""
        limit = min(limit, self.config.num_speculative_tokens)
        if limit <= 0:
            return []
        tokens = seq.token_ids
        index = self._indexes.get(seq.request_id)
        if index is None:
            index = self._indexes[seq.request_id] = _NgramIndex(self._sizes)
        index.extend(tokens)
        for n in self._sizes:
            end = index.last_end[n].get(tuple(tokens[-n:])) if len(tokens) > n else None
            if end is not None:
                return tokens[end : end + limit]
        return []

    def remove(self, request_id: str) -> None:
        self._indexes.pop(request_id, None)
