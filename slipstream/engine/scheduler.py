"""Decides what runs in the next forward pass.

One token budget per step covers decode tokens, prefill chunks and prefix-cache hits (vLLM v1's
shape): running sequences go first (oldest first), then waiting ones while budget, sequence slots
and KV blocks last. When blocks run out, the newest running sequence is preempted: its blocks are
freed and it is recomputed from its tokens later (prompt and output alike), so nothing is lost.

A waiting sequence whose next full prompt block a running sequence is still computing (the other
samples of an n > 1 request, or any shared system prompt) waits for it and then takes it from the
prefix cache instead of computing the same keys and values again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from slipstream.engine.block_manager import BlockManager
from slipstream.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # the guessed tokens (`draft`) included
    draft: list[int] = field(default_factory=list)  # tokens guessed to follow the sequence's, checked this step

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence's known tokens, so it yields a token (one for each row
        from its last known token on: the draft's rows check the guesses)."""
        return self.seq.num_computed_tokens + self.num_new_tokens - len(self.draft) == self.seq.num_tokens


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
        can_sample: Callable[[Sequence], bool] = lambda seq: True,
    ) -> None:
        self.block_manager = block_manager
        # False while a sequence may not sample yet (its grammar still compiling): it runs every
        # chunk but the one that reaches the end of its tokens.
        self.can_sample = can_sample
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.preempted: list[Sequence] = []  # by the last schedule()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free_blocks(seq)
        seq.draft_token_ids = []
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        self.preempted.append(seq)

    def schedule(self) -> list[ScheduledSeq]:
        scheduled: list[ScheduledSeq] = []
        self.preempted = []
        budget, preempted = self._schedule_running(self.max_num_batched_tokens, scheduled)
        # Admitting new work right after a preemption would only thrash the pool.
        if not preempted:
            budget = self._admit_waiting(budget, scheduled)
        self._add_guesses(budget, scheduled)
        return scheduled

    def _add_guesses(self, budget: int, scheduled: list[ScheduledSeq]) -> None:
        """Decoding sequences' guessed next tokens (n-gram speculation) join their step in what budget and blocks
        are left once every sequence has its place: guesses never cost a sequence its turn or its blocks."""
        for s in scheduled:
            draft = s.seq.draft_token_ids[:budget]
            if draft and s.num_new_tokens == 1 and s.samples and self.block_manager.allocate(s.seq, 1 + len(draft)):
                s.num_new_tokens += len(draft)
                s.draft = draft
                budget -= len(draft)

    def _schedule_running(self, budget: int, scheduled: list[ScheduledSeq]) -> tuple[int, bool]:
        """Continue the running sequences, oldest first, preempting the newest when blocks run out.
        Returns the budget left and whether anything was preempted."""
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(self._num_runnable(seq, seq.num_computed_tokens), budget)
            if num_new <= 0:
                i += 1
                continue
            while not self.block_manager.allocate(seq, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
                i += 1
        return budget, preempted

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledSeq]) -> int:
        """Start waiting sequences in arrival order while budget, sequence slots and blocks last. Returns the budget
        left."""
        bm = self.block_manager
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            # Prompt logprobs need every prompt position computed, so such requests skip the cache.
            prefix = bm.lookup_prefix(seq) if seq.params.prompt_logprobs is None else []
            num_cached = len(prefix) * bm.block_size
            if self._block_in_flight(seq, num_cached):
                continue
            num_new = self._num_runnable(seq, num_cached)
            if num_new <= 0:
                continue
            if num_new > budget:
                if not self.enable_chunked_prefill and scheduled:
                    break
                num_new = budget
            if not bm.allocate(seq, num_new, prefix):
                break
            bm.record_lookup(seq.num_tokens, num_cached)
            self.waiting.remove(seq)
            seq.num_computed_tokens = num_cached
            if seq.num_output_tokens == 0:
                seq.num_cached_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return budget

    def _num_runnable(self, seq: Sequence, num_computed: int) -> int:
        """Tokens of `seq` that may run after its first `num_computed`."""
        return seq.num_tokens - num_computed - (0 if self.can_sample(seq) else 1)

    def _block_in_flight(self, seq: Sequence, num_cached: int) -> bool:
        """Whether a running sequence has the same tokens as `seq` up to the end of `seq`'s first
        uncached block and has not computed that block yet (it becomes a cache hit once it has)."""
        if not self.block_manager.enable_prefix_caching:
            return False
        end = num_cached + self.block_manager.block_size
        if end >= seq.num_tokens:  # not a block the prefix cache would serve
            return False
        head = seq.token_ids[:end]
        return any(r.num_computed_tokens < end and r.token_ids[:end] == head for r in self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is and return its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free_blocks(seq)
        seq.status = SequenceStatus.FINISHED
