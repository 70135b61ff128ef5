"""Teacher-forced scoring, for fidelity bounds of a quantized mode against the exact engine: both engines score
the same token sequences, so one early difference does not decide every later position."""

from __future__ import annotations

from slipstream import LLM, SamplingParams


def greedy_sequences(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], list[int]]:
    """Each prompt with `llm`'s greedy continuation (EOS held off), and where each continuation starts."""
    results = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    return [r.prompt_token_ids + r.outputs[0].token_ids for r in results], [len(r.prompt_token_ids) for r in results]


def scores(llm: LLM, sequences: list[list[int]], start: list[int]) -> list[tuple[int, float]]:
    """(top-1 token, logprob of the sequence's own token) at each position from `start` on."""
    results = llm.generate(sequences, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))
    return [(r.prompt_logprobs[pos].top[0][0], r.prompt_logprobs[pos].logprob)
            for r, s in zip(results, start, strict=True) for pos in range(s, len(r.prompt_token_ids))]


def agreement_and_error(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> tuple[float, float]:
    """Top-1 agreement rate and the largest logprob difference of `got` against `want`."""
    agreement = sum(g[0] == w[0] for g, w in zip(got, want, strict=True)) / len(want)
    return agreement, max(abs(g[1] - w[1]) for g, w in zip(got, want, strict=True))
