"""Sampling semantics.

The Sampler is pure torch, so the exact semantics (penalties, top-k/p, min-p, temperature, biases,
bad words, min_tokens, logprob ranks) are checked on crafted logits against transformers' own
logits processors. The behaviour that needs a model (seeds inside mixed batches, stopping, n > 1,
logprobs of a real distribution) runs on the default model through the engine.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from slipstream import SamplingParams
from slipstream.engine.sequence import Sequence
from slipstream.model.sampler import LARGEST_LOGIT, TOP_P_CANDIDATES, Sampler, nucleus_floor

EOS = 0


def make_seq(params: SamplingParams, prompt=(1,), output=()) -> Sequence:
    seq = Sequence("r", list(prompt), params)
    seq.token_ids += list(output)
    return seq


def processed(params: SamplingParams, logits: torch.Tensor, prompt=(1,), output=(), sampler=None) -> torch.Tensor:
    sampler = sampler or Sampler({EOS})
    return sampler.process_logits(logits.unsqueeze(0), [make_seq(params, prompt, output)])[0]


def random_logits(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize(
    "kwargs",
    [dict(n=0), dict(temperature=-0.1), dict(top_p=0.0), dict(min_p=1.5), dict(repetition_penalty=0.0),
     dict(max_tokens=0), dict(min_tokens=5, max_tokens=4), dict(presence_penalty=2.5), dict(frequency_penalty=-3),
     dict(stop=["ok", ""]), dict(logprobs=-1), dict(temperature=float("inf")), dict(temperature=float("nan")),
     dict(top_p=float("nan")), dict(repetition_penalty=float("inf")), dict(frequency_penalty=float("nan"))],
)
def test_invalid_sampling_params_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_sampling_params_accept_api_shapes():
    p = SamplingParams(stop="END", stop_token_ids=None, bad_words=None, logit_bias={"42": 1}, top_k=-1)
    assert (p.stop, p.stop_token_ids, p.bad_words, p.logit_bias, p.top_k) == (["END"], [], [], {42: 1.0}, 0)


@pytest.mark.parametrize("penalty", [1.7, 0.6])
def test_repetition_penalty_is_transformers_over_prompt_and_output(penalty):
    logits = random_logits(32)
    logits[3], logits[5], logits[9] = 2.0, -1.5, 0.7  # seen tokens of both signs
    prompt, output = [3, 5, 7], [5, 9, 11]
    expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + output]), logits.clone()[None])[0]
    got = processed(SamplingParams(repetition_penalty=penalty), logits, prompt, output)
    torch.testing.assert_close(got, expected)
    assert got[3] != logits[3] and got[5] != logits[5] and got[20] == logits[20]


def test_presence_and_frequency_penalties_are_openai_over_output_tokens():
    logits = random_logits(16)
    prompt, output = [1, 2, 2], [4, 4, 4, 6]
    got = processed(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), logits, prompt, output)
    counts = torch.bincount(torch.tensor(output), minlength=16).float()
    torch.testing.assert_close(got, logits - 0.25 * counts - 0.5 * (counts > 0).float())
    assert got[2] == logits[2]  # prompt tokens are not penalised
    encouraged = processed(SamplingParams(presence_penalty=-1.0), logits, prompt, output)
    torch.testing.assert_close(encouraged, logits + (counts > 0).float())


@pytest.mark.parametrize("temperature", [0.0, 1.0, 1e39])
def test_settings_that_leave_no_finite_logit_still_draw_a_token_of_the_vocabulary(temperature):
    """Every token banned: the row is the model's own. A repetition_penalty that float32 rounds to 0: a seen token's
    positive logit becomes the largest (+inf before). A temperature float32 rounds to inf: a uniform draw (-inf / inf
    was NaN). Each of these once drew past the vocabulary (searchsorted over a row of NaN)."""
    logits = random_logits(16)
    logits[4] = 0.0
    torch.testing.assert_close(processed(SamplingParams(bad_words_token_ids=list(range(16))), logits), logits)
    seen = [int(logits.argmax()), 4]  # a positive logit and a zero one
    penalized = processed(SamplingParams(repetition_penalty=1e-300), logits, prompt=seen)
    assert not penalized.isnan().any() and penalized.max() == LARGEST_LOGIT
    masked = logits.clone()
    masked[:8] = float("-inf")  # (as a grammar masks tokens)
    for params in (SamplingParams(temperature=temperature, bad_words_token_ids=list(range(16))),
                   SamplingParams(temperature=temperature, repetition_penalty=1e-300),
                   SamplingParams(temperature=temperature)):
        tokens, _ = Sampler({EOS})(masked[None].repeat(4, 1), [make_seq(params, prompt=seen) for _ in range(4)])
        assert all(0 <= t < 16 for t in tokens), (params, tokens)


def test_logit_bias_is_added():
    logits = random_logits(16)
    got = processed(SamplingParams(logit_bias={"3": 5, 7: -100.0}), logits)
    expected = logits.clone()
    expected[3] += 5
    expected[7] -= 100
    torch.testing.assert_close(got, expected)


def test_bad_words_ban_single_tokens_always_and_the_last_token_of_longer_ones_after_the_rest():
    variants = {"foo": [[10], [11]], "bar baz": [[12, 13]]}
    sampler = Sampler({EOS}, tokenize=variants.__getitem__)
    params = SamplingParams(bad_words=["foo", "bar baz"])
    logits = random_logits(16)
    got = processed(params, logits, output=[5], sampler=sampler)
    banned = {t for t in range(16) if got[t] == float("-inf")}
    assert banned == {10, 11}
    got = processed(params, logits, output=[5, 12], sampler=sampler)
    assert {t for t in range(16) if got[t] == float("-inf")} == {10, 11, 13}


def test_min_tokens_suppresses_eos_and_stop_token_ids_until_reached():
    logits = random_logits(16)

    def suppressed(params, n_out):
        got = processed(params, logits, output=[5] * n_out)
        return {t for t in range(16) if got[t] == float("-inf")}

    params = SamplingParams(min_tokens=3, stop_token_ids=[7])
    assert suppressed(params, 2) == {EOS, 7}
    assert suppressed(params, 3) == set()
    assert suppressed(SamplingParams(min_tokens=3, stop_token_ids=[7], ignore_eos=True), 0) == {7}


def hf_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution transformers samples from, warpers in its order: temperature, top-k, top-p, min-p."""
    scores = TemperatureLogitsWarper(params.temperature)(None, logits.clone()[None])
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p < 1:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    if params.min_p:
        scores = MinPLogitsWarper(params.min_p)(None, scores)
    return scores[0].softmax(-1)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.5),
        SamplingParams(temperature=1.5, top_k=3),
        SamplingParams(temperature=1.0, top_p=0.7),
        SamplingParams(temperature=1.0, min_p=0.3),
        SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.1),
        SamplingParams(temperature=1.0, top_k=1000),  # larger than the vocabulary: no restriction
    ],
    ids=["t1", "t0.5", "topk3", "topp0.7", "minp0.3", "combined", "topk>vocab"],
)
def test_draws_follow_transformers_warped_distribution(params):
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = probs.log()
    expected = hf_distribution(logits, params)
    n = 4000
    seqs = [make_seq(SamplingParams(**{**vars(params), "seed": i})) for i in range(n)]
    tokens, _ = Sampler({99})(logits.expand(n, -1).clone(), seqs)
    freq = torch.bincount(torch.tensor(tokens), minlength=len(probs)).float() / n
    assert set((freq > 0).nonzero().flatten().tolist()) == set((expected > 0).nonzero().flatten().tolist())
    assert (freq - expected).abs().max() < 0.03


@pytest.mark.parametrize("guess", [0, 3, 5])  # the likeliest token, a rare one, one top-p cuts
@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.8)],
                         ids=["t1", "t0.7-topp0.8"])
def test_a_row_that_checks_a_guess_draws_from_the_same_distribution(params, guess):
    """n-gram speculation's rows: the guess stands with its probability, else the row draws from the rest; either
    way the row's token is distributed as the row's warped distribution (speculative sampling's guarantee)."""
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    expected = hf_distribution(probs.log(), params)
    n = 20000
    torch.manual_seed(0)
    tokens, _ = Sampler({99})(probs.log().expand(n, -1).clone(), [make_seq(params)] * n, [guess] * n)
    freq = torch.bincount(torch.tensor(tokens), minlength=len(probs)).float() / n
    assert (freq - expected).abs().max() < 0.015, (freq, expected)
    assert set(freq.nonzero().flatten().tolist()) == set(expected.nonzero().flatten().tolist())
    greedy = Sampler({99})(probs.log()[None].clone(), [make_seq(SamplingParams(temperature=0))], [guess])[0]
    assert greedy == [0]  # a greedy row picks its argmax, guess or not


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_top_p_keeps_transformers_nucleus_over_a_full_vocabulary(top_p):
    """Over SmolLM2's 49,152 tokens, from a peaked row (a nucleus of a few tokens) to flat ones (thousands: more than
    the first TOP_P_CANDIDATES looked at, so the search widens), the tokens kept are TopPLogitsWarper's."""
    spread = torch.tensor([[8.0], [3.0], [1.0], [0.3], [0.05]])
    logits = torch.randn(5, 49152, generator=torch.Generator().manual_seed(3)) * spread
    probs = logits.softmax(dim=-1)
    kept = probs >= nucleus_floor(probs, torch.full((5,), top_p)).unsqueeze(1)
    want = TopPLogitsWarper(top_p)(None, logits.clone()) > float("-inf")
    # Where the two differ, the token lies at the edge: the mass of the tokens above it is top_p to within float32
    # rounding of a sum over the vocabulary (transformers' cumsum from the bottom is sequential: its error grows with
    # the terms summed). Seen: 10,941 tokens against 10,942 in one row; on an AVX2-only CPU, two tokens of 1.76e-6 whose
    # mass above (in float64) is top_p + 1.7e-6 and + 3.5e-6, which transformers keeps and the exact rule drops.
    probs64 = probs.double()
    for row, token in (kept ^ want).nonzero().tolist():
        above = probs64[row][probs64[row] > probs64[row, token]].sum().item()
        assert abs(above - top_p) < 1e-4, (row, token, above)
    assert kept.sum(dim=-1).max() > TOP_P_CANDIDATES and kept.sum(dim=-1).min() < TOP_P_CANDIDATES


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-6])
def test_a_temperature_below_1e_5_is_greedy(temperature):
    logits = random_logits(64, seed=4).expand(2, -1).clone()
    seqs = [make_seq(SamplingParams(temperature=temperature)), make_seq(SamplingParams(temperature=temperature,
                                                                                       top_p=0.5))]
    assert Sampler({EOS})(logits, seqs)[0] == [int(logits[0].argmax())] * 2


def test_a_top_p_too_small_for_float32_keeps_the_most_likely_token():
    logits = random_logits(64, seed=2).expand(2, -1).clone()
    seqs = [make_seq(SamplingParams(temperature=1.0, top_p=5e-324, seed=i)) for i in range(2)]
    assert Sampler({EOS})(logits, seqs)[0] == [int(logits[0].argmax())] * 2


def test_greedy_rows_take_the_argmax_of_processed_logits_in_a_mixed_batch():
    logits = torch.stack([random_logits(64, seed) for seed in range(4)])
    seqs = [
        make_seq(SamplingParams(temperature=0)),
        make_seq(SamplingParams(temperature=1.3, top_k=1)),
        make_seq(SamplingParams(temperature=1.0, seed=3)),
        make_seq(SamplingParams(temperature=0, repetition_penalty=100.0), prompt=[int(logits[3].argmax())]),
    ]
    tokens, _ = Sampler({EOS})(logits, seqs)
    assert tokens[0] == logits[0].argmax() and tokens[1] == logits[1].argmax()
    assert tokens[3] == logits[3].topk(2).indices[1]  # the penalised argmax lost its place


def test_seeded_row_draws_the_same_tokens_whatever_shares_the_batch():
    logits = random_logits(1000, seed=1) / 3  # flat enough that draws vary

    def draws(seed, mates):
        seq = make_seq(SamplingParams(temperature=1.0, seed=seed))
        others = [make_seq(SamplingParams(temperature=t, top_p=0.9)) for t in (0.7, 1.2)][:mates]
        others.append(make_seq(SamplingParams(temperature=1.0, seed=seed + 1)))
        out = []
        for _ in range(6):
            tokens, _ = Sampler({EOS})(logits.expand(1 + len(others), -1).clone(), [seq, *others])
            out.append(tokens[0])
            seq.token_ids.append(tokens[0])
        return out

    assert draws(7, 0) == draws(7, 2)
    assert draws(7, 0) != draws(8, 0)


def test_logprobs_are_of_the_raw_distribution_with_ranks():
    logits = random_logits(32, seed=5)
    order = logits.argsort(descending=True).tolist()
    third = order[2]
    # Greedy made to pick the raw third-best token: the logprob and rank still describe the raw logits.
    params = SamplingParams(temperature=0, logprobs=3, logit_bias={third: 100.0})
    _, (lp,) = Sampler({EOS})(logits[None].clone(), [make_seq(params)])
    raw = logits.log_softmax(-1)
    assert lp.token_id == third and lp.rank == 3
    assert lp.logprob == pytest.approx(raw[third].item())
    assert [t for t, _ in lp.top] == order[:3]
    assert [v for _, v in lp.top] == pytest.approx(raw[order[:3]].tolist())


# --- on the default model, through the engine ------------------------------------------------------

_ids = itertools.count()


def run(llm, requests: list[tuple[list[int], SamplingParams]]) -> list[dict]:
    """Run requests together in one engine; returns per request its token ids, text and finish info."""
    engine = llm.engine
    rids = []
    for prompt, params in requests:
        rids.append(f"sampling-{next(_ids)}")
        engine.add_request(rids[-1], prompt, params)
    results = {rid: {"token_ids": [], "text": "", "logprobs": []} for rid in rids}
    while engine.has_unfinished():
        for out in engine.step():
            r = results[out.request_id]
            r["token_ids"] += out.token_ids
            r["text"] += out.text
            r["logprobs"] += out.logprobs or []
            r["finish_reason"], r["stop_reason"] = out.finish_reason, out.stop_reason
    return [results[rid] for rid in rids]


def chat_ids(llm, text: str) -> list[int]:
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                             add_generation_prompt=True, return_dict=False)


@pytest.fixture(scope="module")
def story(llm_fp32) -> list[int]:
    return llm_fp32.tokenizer.encode("Once upon a time")


@pytest.fixture(scope="module")
def story_greedy(llm_fp32, story) -> dict:
    (greedy,) = run(llm_fp32, [(story, SamplingParams(temperature=0, max_tokens=10, logprobs=0))])
    return greedy


@pytest.fixture(scope="module")
def short_answer(llm_fp32):
    """A chat prompt the model answers in a few tokens, then EOS: its greedy run."""
    ids = chat_ids(llm_fp32, "Reply with one word: yes or no?")
    (greedy,) = run(llm_fp32, [(ids, SamplingParams(temperature=0, max_tokens=8))])
    assert greedy["finish_reason"] == "stop" and greedy["token_ids"][-1] in llm_fp32.engine.eos_token_ids
    assert 3 <= len(greedy["token_ids"]) <= 4
    return ids, greedy["token_ids"]


def test_seed_gives_the_same_tokens_alone_and_in_a_mixed_batch(llm_fp32, story):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=6, ignore_eos=True)
    (alone,) = run(llm_fp32, [(story, seeded)])
    other = llm_fp32.tokenizer.encode("The weather today")
    together = run(llm_fp32, [
        (other, SamplingParams(temperature=1.0, max_tokens=6)),
        (story, SamplingParams(temperature=1.0, seed=4321, max_tokens=6, ignore_eos=True)),
        (story, seeded),
        (other, SamplingParams(temperature=0, max_tokens=4)),
    ])
    assert together[2]["token_ids"] == alone["token_ids"]
    assert together[1]["token_ids"] != alone["token_ids"]


def test_top_k_1_and_temperature_0_are_greedy(llm_fp32, story, story_greedy):
    assert [lp.rank for lp in story_greedy["logprobs"]] == [1] * 10  # each token is the model's argmax
    (top1,) = run(llm_fp32, [(story, SamplingParams(temperature=1.5, top_k=1, max_tokens=10))])
    assert top1["token_ids"] == story_greedy["token_ids"]


def test_min_tokens_holds_off_eos_and_stop_tokens(llm_fp32, short_answer):
    ids, greedy = short_answer
    n = len(greedy)
    eos = llm_fp32.engine.eos_token_ids
    held, stop_held = run(llm_fp32, [
        (ids, SamplingParams(temperature=0, min_tokens=n + 2, max_tokens=n + 4)),
        (ids, SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[greedy[0]], max_tokens=4)),
    ])
    assert held["token_ids"][: n - 1] == greedy[:-1]
    assert len(held["token_ids"]) >= n + 2 and not eos & set(held["token_ids"][: n + 2])
    # Without min_tokens the first token would stop it; with it, the first two cannot be that token.
    assert stop_held["token_ids"][0] != greedy[0] and greedy[0] not in stop_held["token_ids"][:2]


def test_stop_token_ids_ignore_eos_and_max_tokens(llm_fp32, short_answer):
    ids, greedy = short_answer
    n = len(greedy)
    stopped, shown, ignoring, capped = run(llm_fp32, [
        (ids, SamplingParams(temperature=0, stop_token_ids=[greedy[1]], max_tokens=8)),
        (ids, SamplingParams(temperature=0, stop_token_ids=[greedy[1]], max_tokens=8, include_stop_str_in_output=True)),
        (ids, SamplingParams(temperature=0, ignore_eos=True, max_tokens=n + 2)),
        (ids, SamplingParams(temperature=0, max_tokens=n - 1)),
    ])
    for out in (stopped, shown):
        assert out["token_ids"] == greedy[:2]
        assert (out["finish_reason"], out["stop_reason"]) == ("stop", greedy[1])
    # The stop token's text is left out unless include_stop_str_in_output asks for it (vLLM's behaviour).
    decode = llm_fp32.tokenizer.decode
    assert stopped["text"] == decode(greedy[:1]) and shown["text"] == decode(greedy[:2]) != decode(greedy[:1])
    assert ignoring["token_ids"][:n] == greedy and len(ignoring["token_ids"]) == n + 2
    assert ignoring["finish_reason"] == "length"
    assert capped["token_ids"] == greedy[: n - 1] and capped["finish_reason"] == "length"


def test_stop_string_spanning_a_token_boundary(llm_fp32, story, story_greedy):
    tok = llm_fp32.tokenizer
    ids, text = story_greedy["token_ids"], story_greedy["text"]
    # A stop string made of the last two characters of one token and the first two of the next.
    for j in range(1, len(ids)):
        cut = len(tok.decode(ids[:j]))
        stop = text[cut - 2 : cut + 2]
        if len(tok.decode(ids[j - 1 : j])) >= 2 and len(tok.decode(ids[j : j + 1])) >= 2 and text.find(stop) == cut - 2:
            break
    else:
        pytest.fail(f"no stop string spans a token boundary in {text!r}")
    excluded, included = run(llm_fp32, [
        (story, SamplingParams(temperature=0, max_tokens=10, stop=[stop])),
        (story, SamplingParams(temperature=0, max_tokens=10, stop=["no such text", stop],
                               include_stop_str_in_output=True)),
    ])
    assert excluded["text"] == text[: cut - 2] and included["text"] == text[: cut + 2]
    for out in (excluded, included):
        assert out["token_ids"] == ids[: j + 1]
        assert (out["finish_reason"], out["stop_reason"]) == ("stop", stop)


def test_presence_and_frequency_penalties_steer_greedy_the_openai_way(llm_fp32):
    """Logprobs are the model's raw ones; the penalised greedy choice must be their argmax after
    subtracting frequency * count + presence * (count > 0) of each token in the output so far."""
    prompt = llm_fp32.tokenizer.encode("apple apple apple apple apple")
    freq, pres = 1.0, 0.5
    plain, penalised = run(llm_fp32, [
        (prompt, SamplingParams(temperature=0, max_tokens=8)),
        (prompt, SamplingParams(temperature=0, max_tokens=8, frequency_penalty=freq, presence_penalty=pres,
                                logprobs=20)),
    ])
    assert penalised["token_ids"] != plain["token_ids"]
    for i, lp in enumerate(penalised["logprobs"]):
        counts = {t: penalised["token_ids"][:i].count(t) for t in penalised["token_ids"][:i]}

        def score(token, logprob, counts=counts):
            c = counts.get(token, 0)
            return logprob - freq * c - pres * (c > 0)

        assert score(lp.token_id, lp.logprob) >= max(score(t, v) for t, v in lp.top) - 1e-4


def test_logit_bias_and_bad_words_on_the_model(llm_fp32, story, story_greedy):
    tok = llm_fp32.tokenizer
    first = story_greedy["token_ids"][0]
    word = tok.decode([first]).strip()
    forced = tok.encode(" banana")[0]
    biased, banned = run(llm_fp32, [
        (story, SamplingParams(temperature=0, max_tokens=3, logit_bias={forced: 100.0})),
        (story, SamplingParams(temperature=0, max_tokens=3, bad_words=[word])),
    ])
    assert biased["token_ids"] == [forced] * 3
    assert first not in banned["token_ids"]


def test_n_samples_are_distinct_indexed_and_share_the_prompt_blocks(llm_fp32):
    prompt = "Write three different names for a pet goldfish that lives in a tiny glass bowl on my desk:"
    ids = llm_fp32.tokenizer.encode(prompt)
    assert len(ids) > 16  # at least one full KV block to share
    stats = llm_fp32.engine.stats()
    (sampled,) = llm_fp32.generate(prompt, SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=4))
    hits = llm_fp32.engine.stats()["prefix_cache_hits"] - stats["prefix_cache_hits"]
    assert [o.index for o in sampled.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in sampled.outputs}) == 3
    assert hits == 2 * ((len(ids) - 1) // 16 * 16)  # the second and third sample reuse the first one's blocks
    (again,) = llm_fp32.generate(prompt, SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=4))
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in sampled.outputs]
    (greedy,) = llm_fp32.generate(prompt, SamplingParams(n=2, temperature=0, max_tokens=4))
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids


def test_logprob_ranks_on_the_model(llm_fp32, story):
    (out,) = run(llm_fp32, [(story, SamplingParams(temperature=1.2, seed=3, max_tokens=8, logprobs=5))])
    assert len(out["logprobs"]) == 8
    for lp in out["logprobs"]:
        values = [v for _, v in lp.top]
        assert len(lp.top) == 5 and values == sorted(values, reverse=True)
        listed = [t for t, _ in lp.top]
        if lp.token_id in listed:
            assert lp.rank == listed.index(lp.token_id) + 1 and lp.logprob == pytest.approx(values[lp.rank - 1])
        else:
            assert lp.rank > 5 and lp.logprob <= values[-1]
    assert any(lp.rank > 1 for lp in out["logprobs"])  # sampling at temperature 1.2 left the argmax


def test_draws_over_a_full_vocabulary_keep_its_long_tail():
    """A real vocabulary's size (49,152, SmolLM2's), most of the mass outside the top 100: draws land in bands of
    rank as often as the distribution says (a float32 cumulative sum over that many entries must not starve the
    tail)."""
    torch.manual_seed(0)
    logits = torch.randn(49152, generator=torch.Generator().manual_seed(1)) * 2.5
    probs = logits.softmax(-1)
    rows = 2000
    seqs = [make_seq(SamplingParams(temperature=1.0)) for _ in range(rows)]
    tokens = torch.tensor([t for _ in range(5) for t in Sampler({EOS})(logits.expand(rows, -1).clone(), seqs)[0]])
    order = probs.argsort(descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    drawn = rank[tokens]
    for lo, hi in [(0, 10), (10, 100), (100, 1000), (1000, 10000), (10000, len(order))]:
        expected = probs[order[lo:hi]].sum().item()
        assert abs(((drawn >= lo) & (drawn < hi)).float().mean().item() - expected) < 0.02, (lo, hi)
