"""Decides what runs in the next forward pass.

One token budget per step covers decode tokens, prefill chunks and prefix-cache hits (vLLM v1's
shape): running sequences go first (those decoding, then those still prefilling, oldest first within each),
then waiting ones while budget, sequence slots and KV blocks last. When blocks run out, the newest running
sequence not yet scheduled is preempted: its blocks are freed and it is recomputed from its tokens later
(prompt and output alike), so nothing is lost.

Beside decoding sequences, a step's prompt chunks are held to `prefill_beside_decodes` tokens' worth of work
(vLLM's long_prefill_token_threshold, by cost): every decoding sequence waits for the step, and a prompt token
attending to c earlier ones costs 1 + c / `context_cost` tokens (context_cost: the context whose attention costs
what a token's matmuls do). On 2 CPU cores a 2048-token chunk of a 7000-token prompt took 5 s and more: every
other stream's next token waited on it.

Waiting sequences are admitted in turns by API request (each request's first, then each one's second, ...), in
arrival order within each: a request of many sequences (200 prompts x n = 8) kept every later request waiting for
all of them (a stream's first token 234 s late behind 1,600 sequences).

A waiting sequence whose next full prompt block a running sequence is still computing (the other
samples of an n > 1 request, or any shared system prompt) waits for it and then takes it from the
prefix cache instead of computing the same keys and values again.
"""

from __future__ import annotations

import itertools
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
        prefill_beside_decodes: int | None = None,  # None: prompts take what budget the decodes leave
        context_cost: float = float("inf"),
        more_prompts_beside_decodes: int | None = None,  # None: other prompts share prefill_beside_decodes
    ) -> None:
        self.block_manager = block_manager
        # False while a sequence may not sample yet (its grammar still compiling): it runs every
        # chunk but the one that reaches the end of its tokens.
        self.can_sample = can_sample
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.prefill_beside_decodes = prefill_beside_decodes
        self.context_cost = context_cost
        # Beside decodes, the prompt tokens a step takes once one prompt's chunk is in: prompts that arrive together
        # then reach their first tokens one short step after another instead of all at the end of one long step.
        self.more_prompts_beside_decodes = more_prompts_beside_decodes
        self._prefill_work: float | None = None  # this step's, while sequences decode in it
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
        decoding = any(not self._prefilling(s) for s in self.running)
        self._prefill_work = self.prefill_beside_decodes if decoding and self.enable_chunked_prefill else None
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

    @staticmethod
    def _prefilling(seq: Sequence) -> bool:
        """Whether `seq` has more than its next token to compute (a prompt, or what a preemption dropped)."""
        return seq.num_tokens - seq.num_computed_tokens > 1

    def _prompt_chunk(self, seq: Sequence, start: int, num_new: int, scheduled: list[ScheduledSeq]) -> int:
        """`num_new` tokens of a prompt from `start` cut to what is left of this step's prefill work (at least a
        block for the step's first chunk, so that every prompt gets on), and for a later chunk to what is left of
        more_prompts_beside_decodes."""
        if self._prefill_work is None:
            return num_new
        affordable = int(self._prefill_work / (1 + start / self.context_cost))
        prompt_tokens = [s.num_new_tokens for s in scheduled if self._prefilling(s.seq)]
        if not prompt_tokens:
            affordable = max(affordable, self.block_manager.block_size)
        elif self.more_prompts_beside_decodes is not None:
            affordable = min(affordable, self.more_prompts_beside_decodes - sum(prompt_tokens))
        return min(num_new, affordable)

    def _spend_prefill_work(self, start: int, num_new: int) -> None:
        if self._prefill_work is not None:
            self._prefill_work -= num_new * (1 + (start + num_new / 2) / self.context_cost)

    def _schedule_running(self, budget: int, scheduled: list[ScheduledSeq]) -> tuple[int, bool]:
        """Continue the running sequences, those decoding first (a prompt's chunk cannot take their turn), oldest
        first, preempting the newest not yet scheduled when blocks run out. Returns the budget left and whether
        anything was preempted."""
        preempted = False
        for seq in sorted(self.running, key=self._prefilling):  # (stable: oldest first within each)
            if budget <= 0:
                break
            if seq.status != SequenceStatus.RUNNING:  # preempted for an earlier one's blocks
                continue
            start = seq.num_computed_tokens
            num_new = min(self._num_runnable(seq, start), budget)
            if num_new > 1:
                num_new = self._prompt_chunk(seq, start, num_new, scheduled)
            if num_new <= 0:
                continue
            while not self.block_manager.allocate(seq, num_new):
                taken = {s.seq for s in scheduled}
                victim = next(s for s in reversed(self.running) if s not in taken)
                self.running.remove(victim)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
                if num_new > 1:
                    self._spend_prefill_work(start, num_new)
        return budget, preempted

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledSeq]) -> int:
        """Start waiting sequences in arrival order while budget, sequence slots and blocks last. Returns the budget
        left."""
        bm = self.block_manager
        for seq in self._in_turns():
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            # Prompt logprobs need every prompt position computed, so such requests skip the cache.
            prefix = bm.lookup_prefix(seq) if seq.params.prompt_logprobs is None else []
            num_cached = len(prefix) * bm.block_size
            if self._block_in_flight(seq, num_cached):
                continue
            num_new = self._num_runnable(seq, num_cached)
            if num_new > 1:
                num_new = self._prompt_chunk(seq, num_cached, num_new, scheduled)
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
            if num_new > 1:
                self._spend_prefill_work(num_cached, num_new)
        return budget

    def _in_turns(self) -> list[Sequence]:
        """The waiting sequences in admission order: requests in turn, each one's in its own order (preempted ones,
        at the front, stay first in their request's)."""
        by_group: dict[str, list[Sequence]] = {}
        for seq in self.waiting:
            by_group.setdefault(seq.group, []).append(seq)
        if len(by_group) == len(self.waiting):  # a sequence each: arrival order
            return list(self.waiting)
        return [seq for turn in itertools.zip_longest(*by_group.values()) for seq in turn if seq is not None]

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
