"""KV-block accounting: the real Scheduler and BlockManager driven by a fake model.

The fake model writes each token id into the cache slot the block table gives it and checks that
every chunk's context reads back the sequence's own tokens, so a block freed, shared or reused
wrongly shows up as a wrong token, not just as a wrong count. Its "greedy" next token depends only
on the tokens so far, so a request's output must not depend on preemption or prefix-cache hits.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from slipstream.engine.block_manager import BlockManager
from slipstream.engine.scheduler import Scheduler
from slipstream.engine.sequence import Sequence, SequenceStatus
from slipstream.sampling_params import SamplingParams

VOCAB = 3  # a tiny vocabulary makes shared prefixes, and so prefix-cache hits, common


def next_token(tokens: list[int]) -> int:
    return (len(tokens) + 2 * sum(tokens[-3:])) % VOCAB


def reference_output(prompt: list[int], max_tokens: int, max_model_len: int) -> list[int]:
    tokens = list(prompt)
    while len(tokens) - len(prompt) < max_tokens and len(tokens) < max_model_len:
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


class FakeEngine:
    """LLMEngine.step's bookkeeping around the real Scheduler and BlockManager, minus the model."""

    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int = 4, max_num_batched_tokens: int = 32,
                 enable_chunked_prefill: bool = True, enable_prefix_caching: bool = True) -> None:
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.bm, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill)
        self.max_model_len = num_blocks * block_size  # what LLMEngine caps it to
        self.kv: dict[int, int] = {}  # cache slot -> token id written there
        self.seqs: dict[str, Sequence] = {}
        self.finished: dict[str, list[int]] = {}  # request id -> output tokens

    def add(self, request_id: str, prompt: list[int], max_tokens: int) -> Sequence:
        seq = Sequence(request_id, prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> None:
        self.scheduler.finish(self.seqs.pop(request_id))

    def _slot(self, seq: Sequence, pos: int) -> int:
        bs = self.bm.block_size
        return seq.block_table[pos // bs] * bs + pos % bs

    def step(self) -> None:
        batch = self.scheduler.schedule()
        assert sum(s.num_new_tokens for s in batch) <= self.scheduler.max_num_batched_tokens
        assert len(self.scheduler.running) <= self.scheduler.max_num_seqs
        for s in batch:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_new_tokens
            assert seq.status == SequenceStatus.RUNNING and s.num_new_tokens > 0
            assert len(seq.block_table) * self.bm.block_size >= end
            for pos in range(start):
                assert self.kv[self._slot(seq, pos)] == seq.token_ids[pos], "context block holds foreign tokens"
            for pos in range(start, end):
                assert self.bm.ref_counts[seq.block_table[pos // self.bm.block_size]] == 1, "write to a shared block"
                self.kv[self._slot(seq, pos)] = seq.token_ids[pos]
        sampling = [s.samples for s in batch]
        for s in batch:
            s.seq.num_computed_tokens += s.num_new_tokens
        for s, samples in zip(batch, sampling, strict=True):
            seq = s.seq
            if samples:
                seq.token_ids.append(next_token(seq.token_ids))
            self.bm.cache_full_blocks(seq)
            if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
                self.scheduler.finish(seq)
                self.finished[seq.request_id] = seq.output_token_ids
                del self.seqs[seq.request_id]
        self.check_pool()

    def run_to_completion(self, max_steps: int = 5000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished():
                return
            self.step()
        raise AssertionError("the scheduler stopped making progress")

    def check_pool(self) -> None:
        """Reference counts, free list and prefix-cache map agree with the live block tables."""
        live = self.scheduler.running + list(self.scheduler.waiting)
        assert len({id(s) for s in live}) == len(live) == len(self.seqs)
        owners = [0] * self.bm.num_blocks
        for seq in live:
            assert len(set(seq.block_table)) == len(seq.block_table)
            for b in seq.block_table:
                owners[b] += 1
        assert owners == self.bm.ref_counts
        assert set(self.bm.free) == {b for b in range(self.bm.num_blocks) if owners[b] == 0}
        assert all(self.bm.block_hash[b] == h for h, b in self.bm.cached.items())


def test_prefix_hits_reuse_full_blocks_and_are_counted_once():
    eng = FakeEngine(num_blocks=8, block_size=4)
    a = eng.add("a", [1, 2, 0, 1, 2, 0, 1, 2, 0, 1], max_tokens=4)
    eng.step()  # a: whole prompt, two full blocks cached
    b = eng.add("b", a.prompt_token_ids, max_tokens=4)
    eng.step()
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert eng.bm.ref_counts[a.block_table[0]] == 2
    # A prompt of exactly two blocks only reuses one: its last token must be computed for logits.
    c = eng.add("c", a.prompt_token_ids[:8], max_tokens=1)
    eng.run_to_completion()
    assert c.num_cached_tokens == 4
    assert (eng.bm.prefix_queries, eng.bm.prefix_hits) == (10 + 10 + 8, 0 + 8 + 4)
    assert eng.finished["a"] == eng.finished["b"] == reference_output(a.prompt_token_ids, 4, eng.max_model_len)
    # Blocks filled by output tokens are cached too, and freed blocks stay findable until reused.
    d = eng.add("d", a.token_ids, max_tokens=1)
    eng.run_to_completion()
    assert len(a.token_ids) == 14 and d.num_cached_tokens == 12
    assert eng.bm.num_free_blocks == eng.bm.num_blocks


def test_lookup_counted_once_when_admission_waits_for_blocks():
    eng = FakeEngine(num_blocks=4, block_size=4, max_num_seqs=4)
    eng.add("a", [0] * 13, max_tokens=3)  # needs all four blocks
    eng.step()
    eng.add("b", [1] * 5, max_tokens=1)
    eng.step()  # b cannot get blocks until a finishes
    eng.run_to_completion()
    assert eng.bm.prefix_queries == 13 + 5


def test_evicted_blocks_are_no_longer_hits():
    eng = FakeEngine(num_blocks=4, block_size=4)
    eng.add("a", [0] * 9, max_tokens=1)
    eng.run_to_completion()
    eng.add("b", [1] * 15, max_tokens=1)  # takes every block, evicting a's
    eng.run_to_completion()
    c = eng.add("c", [0] * 9, max_tokens=1)
    eng.run_to_completion()
    assert c.num_cached_tokens == 0


def test_identical_prompts_share_blocks_instead_of_computing_them_twice():
    """The n > 1 case: the sibling waits one step and then takes the prompt from the prefix cache."""
    eng = FakeEngine(num_blocks=16, block_size=4)
    prompt = [2, 1, 0, 2, 1, 0, 2, 1, 0, 2]
    seqs = [eng.add(str(i), prompt, max_tokens=3) for i in range(3)]
    eng.step()
    assert [s.status for s in seqs] == [SequenceStatus.RUNNING] + [SequenceStatus.WAITING] * 2
    eng.run_to_completion()
    assert [s.num_cached_tokens for s in seqs] == [0, 8, 8]
    assert len(set(map(tuple, eng.finished.values()))) == 1


def test_preempted_sequence_is_recomputed_with_its_output():
    eng = FakeEngine(num_blocks=4, block_size=2, max_num_seqs=2, enable_prefix_caching=False)
    a = eng.add("a", [0, 1, 2], max_tokens=4)
    b = eng.add("b", [2, 1, 0], max_tokens=4)
    eng.run_to_completion()
    assert eng.scheduler.num_preemptions > 0
    assert eng.finished == {s.request_id: reference_output(s.prompt_token_ids, 4, 8) for s in (a, b)}
    assert eng.bm.num_free_blocks == 4


BASES = ([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2], [2, 2, 1, 1, 0, 0, 2, 2, 1, 1, 0, 0])


@st.composite
def workloads(draw):
    config = dict(
        num_blocks=draw(st.integers(3, 16)),
        block_size=draw(st.sampled_from([1, 2, 4])),
        max_num_seqs=draw(st.integers(1, 5)),
        max_num_batched_tokens=draw(st.integers(1, 40)),
        enable_chunked_prefill=draw(st.booleans()),
        enable_prefix_caching=draw(st.booleans()),
    )
    prompt = st.builds(
        lambda base, n, tail: base[:n] + tail,
        st.sampled_from(BASES), st.integers(0, 12), st.lists(st.integers(0, VOCAB - 1), max_size=6),
    ).filter(bool)
    op = st.one_of(
        st.tuples(st.just("add"), prompt, st.integers(1, 10)),
        st.tuples(st.just("step"), st.integers(1, 4)),
        st.tuples(st.just("abort"), st.integers(0, 50)),
    )
    return config, draw(st.lists(op, max_size=25))


@settings(max_examples=300, deadline=None)
@given(workloads())
def test_random_workloads_return_every_block(workload):
    config, ops = workload
    eng = FakeEngine(**config)
    prompts: dict[str, tuple[list[int], int]] = {}
    aborted: set[str] = set()
    for i, op in enumerate(ops):
        if op[0] == "add":
            prompt = op[1][: eng.max_model_len - 1]  # LLMEngine rejects prompts that fill the context
            prompts[str(i)] = (prompt, op[2])
            eng.add(str(i), prompt, op[2])
        elif op[0] == "step":
            for _ in range(op[1]):
                if eng.scheduler.has_unfinished():
                    eng.step()
        elif eng.seqs:
            victim = sorted(eng.seqs)[op[1] % len(eng.seqs)]
            eng.abort(victim)
            aborted.add(victim)
            eng.check_pool()
    eng.run_to_completion()

    assert eng.bm.num_free_blocks == eng.bm.num_blocks and not any(eng.bm.ref_counts)
    assert set(eng.finished) | aborted == set(prompts) and not set(eng.finished) & aborted
    for rid, out in eng.finished.items():
        prompt, max_tokens = prompts[rid]
        assert out == reference_output(prompt, max_tokens, eng.max_model_len)
