"""N-gram speculation's guesses ("prompt lookup", vLLM's `ngram` method): which tokens may come next in a
sequence, read from its own context and, where that holds no match, from the answers of recently finished requests.

The guess is what followed the last earlier occurrence of the context's last n tokens (n from prompt_lookup_max
down to prompt_lookup_min, the longest match first). Each sequence keeps an index of its n-grams, each mapped to
where it last ended, extended with the tokens appended since the last lookup: a lookup costs the same at 100
tokens of context as at 100,000. A finished request's output is indexed once and kept among the last
`lookup_recent_outputs` (SuffixDecoding's observation, vLLM's `suffix` method: answers repeat each other's phrases,
a chat model's boilerplate, a schema's keys, an agent's tool calls).
"""

from __future__ import annotations

from collections import deque

from slipstream.config import SpeculativeConfig
from slipstream.engine.sequence import Sequence

# A finished output's first tokens indexed, at most: 32 kept outputs' indexes stay within ~15 MB.
MAX_INDEXED_OUTPUT = 2048


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
        self._recent: deque[tuple[list[int], _NgramIndex]] = deque(maxlen=config.lookup_recent_outputs)

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        """Up to min(num_speculative_tokens, limit) tokens that may follow `seq`'s tokens; [] when neither its context
        nor a recent output holds an earlier occurrence of its last prompt_lookup_min tokens."""
        limit = min(limit, self.config.num_speculative_tokens)
        if limit <= 0:
            return []
        tokens = seq.token_ids
        index = self._indexes.get(seq.request_id)
        if index is None:
            index = self._indexes[seq.request_id] = _NgramIndex(self._sizes)
        index.extend(tokens)
        ngrams = {n: tuple(tokens[-n:]) for n in self._sizes if len(tokens) > n}
        for n, ngram in ngrams.items():
            if (end := index.last_end[n].get(ngram)) is not None:
                return tokens[end : end + limit]
        for output, output_index in self._recent:  # (indexed when first looked up: not while batches are too big)
            output_index.extend(output)
        for n, ngram in ngrams.items():  # else the latest output that holds the longest match
            for output, output_index in reversed(self._recent):
                if (end := output_index.last_end[n].get(ngram)) is not None:
                    return output[end : end + limit]
        return []

    def finish(self, seq: Sequence) -> None:
        """`seq` is done: its index goes, and its output joins the recent ones looked up."""
        self._indexes.pop(seq.request_id, None)
        output = seq.output_token_ids[:MAX_INDEXED_OUTPUT]
        if self._recent.maxlen and len(output) > self.config.prompt_lookup_min:  # (shorter: no n-gram a token follows)
            self._recent.append((output, _NgramIndex(self._sizes)))
