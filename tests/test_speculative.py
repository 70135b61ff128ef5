"""N-gram speculation (--speculative-config): requests guess their next tokens from their own context and check the
guesses in the step that computes their next token. The guesses change how many steps a request takes, never a
greedy request's tokens or logprobs: each guessed row's logits are the ones a step of its own would give (every row
alone through the same kernels: test_batch_invariance.py), and a guess stands only where it is the token picked. A
sampled request's guess stands with its probability (test_sampling.py: the draws keep their distribution)."""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_utils import running_server

from slipstream import LLM, SamplingParams
from slipstream.config import SpeculativeConfig
from slipstream.engine.block_manager import BlockManager
from slipstream.engine.ngram_proposer import NgramProposer
from slipstream.engine.scheduler import Scheduler
from slipstream.engine.sequence import Sequence
from slipstream.entrypoints.openai.args import speculative_config
from slipstream.kernels import kernels

# Prompts whose greedy answers repeat what they were given, so that guesses are made and taken.
REPEATING = ["List the days of the week, twice.",
             "Repeat this sentence three times: the quick brown fox jumps over the lazy dog."]
OTHER = "Write a haiku about the sea."
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": 4}  # (3 run in one test)


def proposer(**config) -> NgramProposer:
    return NgramProposer(SpeculativeConfig(**config))


def test_a_guess_is_what_followed_the_last_earlier_occurrence_of_the_longest_suffix():
    seq = Sequence("r", [1, 2, 3, 9, 1, 2, 3, 8, 5, 2, 3], SamplingParams())
    p = proposer(num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=1)
    # [.., 2, 3] last came before 8 (positions 5-6), and [1, 2, 3] does not end the context: the 2-gram decides
    assert p.propose(seq, limit=10) == [8, 5, 2]
    assert p.propose(seq, limit=1) == [8]
    seq.token_ids += [1, 2, 3]  # now the 3-gram [1, 2, 3] matches, last at positions 4-6
    assert p.propose(seq, limit=10) == [8, 5, 2]
    seq.token_ids.append(7)  # a token never seen before: nothing to look up
    assert p.propose(seq, limit=10) == []
    seq.token_ids.append(1)  # [7, 1] unseen; [1] last came before 2 (position 11)
    assert p.propose(seq, limit=10) == [2, 3, 7]
    assert proposer(prompt_lookup_max=2, prompt_lookup_min=2).propose(seq, limit=10) == []
    assert p.propose(seq, limit=0) == []


def finished(request_id: str, prompt: list[int], output: list[int]) -> Sequence:
    seq = Sequence(request_id, prompt, SamplingParams())
    seq.token_ids += output
    return seq


def test_where_its_own_context_holds_no_match_a_sequence_guesses_from_the_latest_finished_outputs():
    p = proposer(num_speculative_tokens=3, lookup_recent_outputs=2)
    p.finish(finished("a", [1, 2, 3], [4, 5, 6, 7, 8, 9]))
    seq = Sequence("b", [20, 5, 6], SamplingParams())
    assert p.propose(seq, limit=10) == [7, 8, 9]  # [5, 6] came before 7, 8, 9 in a's output
    assert p.propose(Sequence("c", [20, 2, 3], SamplingParams()), limit=10) == []  # a's prompt is not looked up
    seq.token_ids += [5, 6]  # its own context's match comes first: [5, 6] came before 5 in it
    assert p.propose(seq, limit=10) == [5, 6]
    p.finish(finished("d", [1], [30, 5, 6, 31, 32]))
    assert p.propose(Sequence("e", [20, 5, 6], SamplingParams()), limit=2) == [31, 32]  # the latest output first
    # ... unless an earlier one matches longer: [4, 5, 6] is in a's only
    assert p.propose(Sequence("f", [20, 4, 5, 6], SamplingParams()), limit=2) == [7, 8]
    p.finish(finished("g", [1], [40, 41]))  # too short to hold an n-gram a token follows: not kept
    assert p.propose(Sequence("h", [20, 4, 5, 6], SamplingParams()), limit=2) == [7, 8]
    p.finish(finished("i", [1], [40, 41, 42]))  # two outputs kept: a's goes
    assert p.propose(Sequence("j", [20, 4, 5, 6], SamplingParams()), limit=2) == [31, 32]
    alone = proposer(lookup_recent_outputs=0)
    alone.finish(finished("a", [1, 2, 3], [4, 5, 6, 7, 8, 9]))
    assert alone.propose(Sequence("b", [20, 5, 6], SamplingParams()), limit=10) == []


def test_bad_configs_are_refused_with_the_key_named():
    with pytest.raises(ValueError, match="method"):
        SpeculativeConfig.from_dict({"method": "eagle"})
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig.from_dict({"num_speculative_tokens": 0})
    with pytest.raises(ValueError, match="unknown keys"):
        SpeculativeConfig.from_dict({"num_spec_tokens": 2})
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        SpeculativeConfig.from_dict({"prompt_lookup_max": 1, "prompt_lookup_min": 2})
    with pytest.raises(ValueError, match="lookup_recent_outputs"):
        SpeculativeConfig.from_dict({"lookup_recent_outputs": -1})
    # Only a longest n-gram below the default shortest: the shortest follows it (as vLLM's does) instead of refusing.
    only_max = SpeculativeConfig.from_dict({"prompt_lookup_max": 1})
    assert (only_max.prompt_lookup_max, only_max.prompt_lookup_min) == (1, 1)
    done = subprocess.run([sys.executable, "-m", "slipstream.entrypoints.openai.api_server", "--speculative-config",
                           '{"method": "ngram", "num_speculative_tokens": -1}'], capture_output=True, text=True)
    assert done.returncode == 2 and "num_speculative_tokens must be a positive integer" in done.stderr
    assert "Traceback" not in done.stderr


def decoding(sched: Scheduler, *prompt_lengths: int) -> list[Sequence]:
    """Sequences of `sched` past their prompts, each with one sampled token to decode next."""
    seqs = [Sequence(f"s{i}", list(range(n)), SamplingParams()) for i, n in enumerate(prompt_lengths)]
    for seq in seqs:
        sched.add(seq)
    for s in sched.schedule():
        s.seq.num_computed_tokens += s.num_new_tokens
        s.seq.token_ids.append(7)
    return seqs


def test_guesses_take_only_the_budget_and_blocks_every_sequence_left():
    sched = Scheduler(BlockManager(num_blocks=4, block_size=4), max_num_seqs=4, max_num_batched_tokens=16)
    a, b = decoding(sched, 3, 3)  # 4 tokens, one full block each
    a.draft_token_ids = [1, 2, 3]
    [sa, sb] = sched.schedule()
    # a's 4 rows (its last token and 3 guesses) take a second block
    assert (sa.seq, sa.num_new_tokens, sa.draft, sa.samples) == (a, 4, [1, 2, 3], True)
    assert (sb.seq, sb.num_new_tokens, sb.draft, sb.samples) == (b, 1, [], True)
    for s in (sa, sb):  # the guesses rejected: one new token each
        s.seq.num_computed_tokens += s.num_new_tokens - len(s.draft)
        s.seq.token_ids.append(7)
    # b's next token needs the last free block, which a's 4 guesses would have needed too: a guesses nothing this
    # step, b (within its blocks) does
    a.draft_token_ids, b.draft_token_ids = [1, 2, 3, 4], [4, 5]
    batch = sched.schedule()
    assert [(s.seq, s.num_new_tokens, s.draft) for s in batch] == [(a, 1, []), (b, 3, [4, 5])]
    assert sched.num_preemptions == 0
    tight = Scheduler(BlockManager(num_blocks=8, block_size=4), max_num_seqs=4, max_num_batched_tokens=3)
    [c] = decoding(tight, 2)
    c.draft_token_ids = [1, 2, 3, 4]
    [sc] = tight.schedule()
    assert (sc.num_new_tokens, sc.draft) == (3, [1, 2])  # the budget's 3 rows: the token and 2 guesses


def results(llm: LLM, prompts: list[str], params: SamplingParams | list[SamplingParams]):
    out = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    return [(r.outputs[0].token_ids, [t.logprob for t in r.outputs[0].logprobs or []], r.outputs[0].finish_reason)
            for r in out]


@pytest.mark.parametrize("quantization", [None, "w4a8"])
def test_speculation_gives_the_tokens_and_logprobs_of_plain_decoding_in_fewer_steps(quantization):
    if quantization and kernels().ops is None:
        pytest.skip("w4a8 needs the compiled CPU kernels")
    greedy = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=2)
    cut = SamplingParams(temperature=0, max_tokens=48, stop=["Thursday: Thursday"], logprobs=0)
    seeded = SamplingParams(temperature=0.8, seed=5, max_tokens=24, logprobs=0)  # drawn: never guessed for
    # No prefix cache: each prompt's prefill then computes all its rows, in both engines alike (exact mode multiplies
    # 8 rows or more as tiles, fewer row by row: a prompt's cached blocks would change how many rows its tail takes)
    plain = LLM(kv_cache_memory=64 << 20, quantization=quantization, enable_prefix_caching=False)
    alone = [results(plain, [p], greedy)[0] for p in REPEATING]
    stopped = results(plain, [REPEATING[0]], cut)[0]
    drawn = results(plain, [OTHER], seeded)[0]
    other = results(plain, [OTHER], greedy)[0]
    plain.engine.shutdown()

    spec = LLM(kv_cache_memory=64 << 20, quantization=quantization, speculative_config=SPEC,
               enable_prefix_caching=False)
    engine = spec.engine
    steps = 0
    step = engine.step

    def counted_step():
        nonlocal steps
        steps += 1
        return step()

    engine.step = counted_step
    # one at a time: each as plain decoding computed it (a step's rows, a token and its guesses, within the row-by-row
    # kernels' range; w4a8's matmuls are the same at any row count)
    for prompt, expected in zip(REPEATING, alone, strict=True):
        assert results(spec, [prompt], greedy)[0] == expected
    assert engine.num_draft_tokens > engine.num_accepted_tokens > 5
    # a step a token (the prompt's step samples the first), less one a guess taken
    assert steps == sum(len(tokens) for tokens, _, _ in alone) - engine.num_accepted_tokens
    assert results(spec, [REPEATING[0]], cut)[0] == stopped
    assert stopped[2] == "stop" and len(stopped[0]) < len(alone[0][0])
    # a request whose own context predicts little guesses from the answers before it: asked again, most of its
    # tokens are guessed from its last answer, and the answer stays plain decoding's
    accepted = engine.num_accepted_tokens
    assert results(spec, [OTHER], greedy)[0] == other
    first_time = engine.num_accepted_tokens - accepted
    assert results(spec, [OTHER], greedy)[0] == other
    assert engine.num_accepted_tokens - accepted - first_time > max(first_time, len(other[0]) // 2)
    if quantization:  # batched with each other and a sampled request
        accepted = engine.num_accepted_tokens
        assert results(spec, [*REPEATING, OTHER], [greedy, greedy, seeded]) == [*alone, drawn]
        assert engine.num_accepted_tokens > accepted
    spec.engine.shutdown()


@pytest.mark.skipif(kernels().ops is None, reason="w4a8 needs the compiled CPU kernels")
def test_sampled_requests_guess_too_and_seeded_ones_do_not():
    spec = LLM(kv_cache_memory=64 << 20, quantization="w4a8", speculative_config=SPEC)
    engine = spec.engine
    sampled = SamplingParams(temperature=0.5, max_tokens=48, ignore_eos=True)
    [(tokens, _, _)] = results(spec, [REPEATING[0]], sampled)
    assert len(tokens) == 48 and engine.num_accepted_tokens > 0
    checked = engine.num_draft_tokens
    results(spec, [REPEATING[0]], SamplingParams(temperature=0.5, seed=1, max_tokens=48, ignore_eos=True))
    assert engine.num_draft_tokens == checked
    spec.engine.shutdown()


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.skipif(kernels().ops is None, reason="w4a8 needs the compiled CPU kernels")
def test_a_served_greedy_chat_is_the_same_with_speculation():
    messages = [{"role": "user", "content": REPEATING[0]}]
    plain = LLM(kv_cache_memory=64 << 20, quantization="w4a8")
    expected = plain.chat([messages], SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    plain.engine.shutdown()
    with running_server("--quantization", "w4a8", "--speculative-config", '{"method": "ngram"}') as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model="default", messages=messages, temperature=0, max_tokens=40)
        assert answer.choices[0].message.content == expected.text
        before = metrics(server.url)["slipstream:spec_decode_num_accepted_tokens_total"]
        stream = list(client.chat.completions.create(model="default", messages=messages, temperature=0,
                                                     max_tokens=40, stream=True,
                                                     stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected.text
        counts = metrics(server.url)
        # a step's tokens (a guess that stood and the next) come in one chunk: at most a chunk a step
        accepted_here = counts["slipstream:spec_decode_num_accepted_tokens_total"] - before
        content_chunks = sum(1 for c in stream if c.choices and c.choices[0].delta.content)
        assert accepted_here > 0 and content_chunks <= stream[-1].usage.completion_tokens - accepted_here
        accepted = counts["slipstream:spec_decode_num_accepted_tokens_total"]
        # (every guess may stand here: rejections are tested in-process)
        assert counts["slipstream:spec_decode_num_draft_tokens_total"] >= accepted > 0
        # the dashboard's stats say the same
        assert httpx.get(f"{server.url}/v1/engine/stats").json()["speculation"] == {
            "checked_tokens": counts["slipstream:spec_decode_num_draft_tokens_total"], "accepted_tokens": accepted}


@pytest.mark.skipif(kernels().ops is None, reason="guessing by default needs the compiled CPU block kernels")
def test_the_server_guesses_by_default_for_a_lone_sequence_and_its_answer_stays_the_reference():
    """Without --speculative-config the server guesses at batch 1 (exact mode, one rank's CPU kernels: a guessed
    row is summed as a lone row is), and gives plain decoding's greedy answer; null turns guessing off."""
    messages = [{"role": "user", "content": REPEATING[1]}]
    plain = LLM(kv_cache_memory=64 << 20)
    expected = plain.chat([messages], SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    plain.engine.shutdown()
    assert speculative_config("null") is None and speculative_config("auto") == "auto"
    with running_server() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model="default", messages=messages, temperature=0, max_tokens=40)
        assert answer.choices[0].message.content == expected.text
        assert metrics(server.url)["slipstream:spec_decode_num_accepted_tokens_total"] > 0
