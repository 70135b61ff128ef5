"""Scheduling decisions (token budget, chunked prefill, sequence slots, preemption), then the same
machinery on the real model with a KV pool small enough to force preemption."""

from __future__ import annotations

import itertools

import pytest

from slipstream import LLM, SamplingParams
from slipstream.engine.block_manager import BlockManager
from slipstream.engine.scheduler import Scheduler
from slipstream.engine.sequence import Sequence, SequenceStatus


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=16, chunked=True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, budget, chunked)


def add(sched: Scheduler, name: str, num_prompt: int, first_token: int = 0) -> Sequence:
    seq = Sequence(name, list(range(first_token, first_token + num_prompt)), SamplingParams())
    sched.add(seq)
    return seq


def advance(batch) -> None:
    """What the engine does after the forward pass: count computed tokens, append sampled ones."""
    sampling = [s.samples for s in batch]
    for s in batch:
        s.seq.num_computed_tokens += s.num_new_tokens
    for s, samples in zip(batch, sampling, strict=True):
        if samples:
            s.seq.token_ids.append(7)


def test_long_prompt_is_prefilled_in_budget_sized_chunks_and_samples_once():
    sched = make_scheduler(budget=16)
    seq = add(sched, "long", 50)
    chunks = []
    while seq.num_output_tokens == 0:
        (s,) = sched.schedule()
        chunks.append((s.num_new_tokens, s.samples))
        advance([s])
    assert chunks == [(16, False), (16, False), (16, False), (2, True)]


def test_decodes_go_first_and_new_prompts_take_the_rest_of_the_budget():
    sched = make_scheduler(budget=16)
    a = add(sched, "a", 5)
    advance(sched.schedule())
    b = add(sched, "b", 40, first_token=100)
    batch = sched.schedule()
    assert [(s.seq, s.num_new_tokens) for s in batch] == [(a, 1), (b, 15)]


def test_a_newer_decode_goes_before_an_older_prompts_chunk():
    """Running sequences were served oldest first, each taking what it could: an older prompt's chunk (a long prompt,
    or one recomputed after a preemption) took the budget and a newer sequence's next token waited for all of it."""
    sched = make_scheduler(budget=16)
    old, new = add(sched, "old", 40), add(sched, "new", 3, first_token=100)
    for seq, computed in ((old, 8), (new, 3)):  # both running: old 8 tokens into its prompt, new decoding
        sched.waiting.remove(seq)
        sched.running.append(seq)
        assert sched.block_manager.allocate(seq, computed)
        seq.num_computed_tokens, seq.status = computed, SequenceStatus.RUNNING
    new.token_ids.append(7)
    batch = sched.schedule()
    assert [(s.seq, s.num_new_tokens) for s in batch] == [(new, 1), (old, 15)]


def test_beside_decodes_a_prompts_chunk_is_held_to_its_work_which_grows_with_its_context():
    """A prompt token costs 1 + start / context_cost tokens of work (its attention to the tokens before it); beside
    decodes a step's prompt chunks do at most prefill_beside_decodes of it, and at least a block (progress)."""
    sched = Scheduler(BlockManager(512, 4), 8, 512, prefill_beside_decodes=64, context_cost=50)
    alone = add(sched, "alone", 1000)
    assert [s.num_new_tokens for s in sched.schedule()] == [512]  # nothing decodes: the whole budget
    sched.finish(alone)
    decoding = add(sched, "decoding", 3, first_token=5000)
    advance(sched.schedule())
    long = add(sched, "long", 1000)
    chunks = []
    while long.num_output_tokens == 0:
        batch = sched.schedule()
        assert batch[0].seq is decoding and batch[0].num_new_tokens == 1
        chunks += [(s.seq.num_computed_tokens, s.num_new_tokens) for s in batch[1:]]
        advance(batch)
    assert chunks[:2] == [(0, 64), (64, 28)]  # 64 / (1 + 64 / 50) = 28
    assert all(n == min(max(int(64 / (1 + start / 50)), 4), 1000 - start) for start, n in chunks), chunks
    assert chunks[-2][1] == 4 and sum(n for _, n in chunks) == 1000


def test_beside_decodes_prompts_after_a_steps_first_share_a_small_allowance():
    """Prompts that arrive together while others decode prefill about one to a step (the step's first chunk may
    take the whole work cap, later ones fill up to more_prompts_beside_decodes tokens), so that each reaches its
    first token a short step after the one before; with nothing decoding a burst takes the whole budget."""
    sched = Scheduler(BlockManager(512, 4), 8, 512, prefill_beside_decodes=1024, more_prompts_beside_decodes=128)
    burst = [add(sched, f"burst-{i}", 100, first_token=1000 * i) for i in range(6)]
    assert [s.num_new_tokens for s in sched.schedule()] == [100, 100, 100, 100, 100, 12]  # nothing decodes
    for seq in burst:
        sched.finish(seq)
    decoding = add(sched, "decoding", 3, first_token=9000)
    advance(sched.schedule())
    late = [add(sched, f"late-{i}", 100, first_token=10000 + 1000 * i) for i in range(3)]
    steps = []
    while any(seq.num_output_tokens == 0 for seq in late):
        batch = sched.schedule()
        assert batch[0].seq is decoding and batch[0].num_new_tokens == 1
        steps.append([(s.seq.request_id, s.num_new_tokens) for s in batch if s.seq.num_output_tokens == 0])
        advance(batch)
    assert steps == [[("late-0", 100), ("late-1", 28)], [("late-1", 72), ("late-2", 56)], [("late-2", 44)]]
    long = add(sched, "long", 1000, first_token=20000)  # the only prompt beside the streams: the whole budget
    assert [(s.seq, s.num_new_tokens) for s in sched.schedule()] == [(decoding, 1), *((seq, 1) for seq in late),
                                                                      (long, 508)]


def test_waiting_requests_are_admitted_in_turns():
    """A request of many sequences (prompts x n) was admitted whole before any request after it: a request of one
    now waits for at most one of its sequences a free slot."""
    sched = make_scheduler(max_num_seqs=2, budget=64)
    many = [Sequence(f"many-{i}", [1, 2, 3], SamplingParams(), group="many") for i in range(6)]
    for seq in many:
        sched.add(seq)
    one = add(sched, "one", 3, first_token=100)
    assert [s.seq for s in sched.schedule()] == [many[0], one]
    assert sched.waiting[0] is many[1] and len(sched.waiting) == 5
    assert [s.group for s in (many[0], one)] == ["many", "one"]  # (its own id where none is given)


def test_without_chunked_prefill_a_prompt_waits_for_a_step_it_fits_in():
    sched = make_scheduler(budget=16, chunked=False)
    a = add(sched, "a", 5)
    advance(sched.schedule())
    add(sched, "b", 20, first_token=100)
    assert [(s.seq, s.num_new_tokens) for s in sched.schedule()] == [(a, 1)]


def test_sequence_slots_limit_admission():
    sched = make_scheduler(max_num_seqs=2, budget=64)
    seqs = [add(sched, str(i), 3, first_token=10 * i) for i in range(3)]
    assert [s.seq for s in sched.schedule()] == seqs[:2] and seqs[2].status == SequenceStatus.WAITING


def test_preemption_frees_the_newest_and_admits_nothing_that_step():
    sched = make_scheduler(num_blocks=4, block_size=4, budget=64)
    old = add(sched, "old", 7)
    new = add(sched, "new", 8, first_token=100)
    advance(sched.schedule())  # old: 2 blocks, new: 8 prompt tokens + 1 sampled -> 3 blocks wanted, has 2
    late = add(sched, "late", 2, first_token=200)
    batch = sched.schedule()
    assert [s.seq for s in batch] == [old]
    assert new.status == SequenceStatus.WAITING and new.block_table == [] and new.num_computed_tokens == 0
    assert list(sched.waiting) == [new, late] and sched.num_preemptions == 1
    # When it comes back, it recomputes its prompt and its output token.
    sched.finish(old)
    (resumed,) = [s for s in sched.schedule() if s.seq is new]
    assert resumed.num_new_tokens == 9 and resumed.samples


# --- the real model with a tiny KV pool ---------------------------------------------------------------

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away,", "def add(a, b):",
           "List three colors:", "My favourite food is"]
GREEDY = SamplingParams(temperature=0, max_tokens=8)


def tiny_pool(llm_fp32, **config) -> LLM:
    """The default model with 10 KV blocks of 4 tokens: five short requests cannot all fit."""
    engine = llm_fp32.engine
    token_bytes = engine.runner.kv_cache_bytes // (engine.runner.num_blocks * engine.config.block_size)
    return LLM(kv_cache_memory=10 * 4 * token_bytes, block_size=4, max_num_seqs=5, **config)


@pytest.fixture(scope="module")
def tiny_llm(llm_fp32) -> LLM:
    return tiny_pool(llm_fp32)


@pytest.fixture(scope="module")
def tiny_guessing_llm(llm_fp32) -> LLM:
    """tiny_llm with n-gram speculation at any batch size: guesses compete for the few blocks too."""
    return tiny_pool(llm_fp32, speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                                   "prompt_lookup_min": 1, "disable_by_batch_size": 8})


@pytest.fixture(scope="module")
def reference(llm_fp32) -> list[list[int]]:
    return [r.outputs[0].token_ids for r in llm_fp32.generate(PROMPTS, GREEDY)]


def assert_pool_empty(engine) -> None:
    bm = engine.block_manager
    assert not engine.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts)


@pytest.mark.parametrize("pool", ["tiny_llm", "tiny_guessing_llm"])
def test_preemption_and_aborts_lose_nothing_and_return_every_block(pool, reference, request):
    tiny_llm = request.getfixturevalue(pool)
    engine = tiny_llm.engine
    assert engine.block_manager.num_blocks == 10
    preemptions = engine.stats()["num_preemptions"]
    ids = {f"tiny-{i}": tiny_llm.tokenizer.encode(p) for i, p in enumerate(PROMPTS)}
    for rid, prompt in ids.items():
        engine.add_request(rid, prompt, GREEDY)
    for victim in ("victim-0", "victim-1"):
        engine.add_request(victim, tiny_llm.tokenizer.encode("A request that will be cancelled"), GREEDY)
    outputs = {rid: [] for rid in ids}
    aborted = []
    for step in itertools.count():
        if not engine.has_unfinished():
            break
        if step in (2, 4):
            aborted.append(engine.abort_request(f"victim-{step // 2 - 1}"))
        for out in engine.step():
            outputs.get(out.request_id, []).extend(out.token_ids)
    assert engine.stats()["num_preemptions"] > preemptions
    assert [outputs[rid] for rid in ids] == reference
    assert (engine.num_draft_tokens > 0) == (engine.proposer is not None)
    assert [(a.finished, a.finish_reason) for a in aborted] == [(True, "abort")] * 2
    assert_pool_empty(engine)


def test_prefix_cache_hit_gives_the_same_greedy_output(tiny_llm):
    prompt = "Tell me a short story about a brave little robot"  # > 4 full blocks of 4 tokens
    (first,) = tiny_llm.generate(prompt, GREEDY)
    hits = tiny_llm.engine.stats()["prefix_cache_hits"]
    (second,) = tiny_llm.generate(prompt, GREEDY)
    expected = (len(first.prompt_token_ids) - 1) // 4 * 4
    assert second.num_cached_tokens == expected >= 8
    assert tiny_llm.engine.stats()["prefix_cache_hits"] - hits == expected
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert_pool_empty(tiny_llm.engine)


def test_a_cpu_engine_steps_512_tokens_unless_told_and_holds_prompts_beside_decodes_as_before(llm_fp32):
    """The default budget on a CPU (llm_engine.CPU_STEP_TOKENS) splits a burst of prompts into steps whose first
    prompts decode while the later ones prefill; a long prompt's chunks beside a stream keep the work cap of a
    2048-token step; the server's engine (its EngineConfig) also holds prompts after a step's first to
    CPU_PROMPTS_BESIDE_DECODES tokens beside decodes, an offline one does not; a given budget is the budget, prompts
    beside decodes sharing its work cap."""
    from slipstream.engine.llm_engine import CPU_PROMPTS_BESIDE_DECODES, CPU_STEP_TOKENS, LLMEngine
    from slipstream.entrypoints.openai.args import engine_config, make_arg_parser

    sched = llm_fp32.engine.scheduler
    assert (sched.max_num_batched_tokens, sched.prefill_beside_decodes, sched.more_prompts_beside_decodes) == (
        CPU_STEP_TOKENS, 1024, None) == (512, 1024, None)
    served = engine_config(make_arg_parser().parse_args(["--kv-cache-memory", str(16 << 20)]))
    assert served.split_prompt_bursts and served.max_num_batched_tokens is None
    assert LLMEngine(served).scheduler.more_prompts_beside_decodes == CPU_PROMPTS_BESIDE_DECODES == 128
    explicit = engine_config(make_arg_parser().parse_args(["--max-num-batched-tokens", "4096",
                                                       "--kv-cache-memory", str(16 << 20)]))
    explicit = LLMEngine(explicit).scheduler
    assert (explicit.max_num_batched_tokens, explicit.prefill_beside_decodes) == (4096, 2048)
    assert explicit.more_prompts_beside_decodes is None
