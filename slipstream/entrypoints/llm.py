"""Offline API: `LLM(model=...).generate(prompts, SamplingParams(...))` and `.chat(messages)`."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

from slipstream.config import EngineConfig
from slipstream.engine.llm_engine import LLMEngine
from slipstream.engine.output_processor import RequestOutput
from slipstream.engine.sequence import TokenLogprobs
from slipstream.sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        if out.logprobs is not None:
            self.logprobs = (self.logprobs or []) + out.logprobs
        self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # with SamplingParams.prompt_logprobs


def fan_out(params: SamplingParams) -> list[SamplingParams]:
    """n > 1 becomes n single sequences; seeded ones get distinct, reproducible seeds."""
    if params.n == 1:
        return [params]
    return [replace(params, n=1, seed=None if params.seed is None else params.seed + i) for i in range(params.n)]


class LLM:
    def __init__(self, model: str | None = None, **kwargs) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[GenerationResult]:
        """`prompts`: a string, a list of strings, or a list of token-id lists; `params`: one for all, or one a
        prompt (as vLLM's LLM.generate takes them)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        each = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(each) != len(prompts):
            raise ValueError(f"{len(each)} sampling params for {len(prompts)} prompts")
        for p in each:
            if p.structured_outputs is not None:  # an invalid grammar raises here, before anything runs
                self.engine.structured_output.compile(p.structured_outputs).result()
        results: list[GenerationResult] = []
        owners: dict[str, CompletionOutput] = {}
        by_rid: dict[str, GenerationResult] = {}
        for prompt, prompt_params in zip(prompts, each, strict=True):
            ids = self.tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
            result = GenerationResult(ids, [])
            for i, p in enumerate(fan_out(prompt_params)):
                rid = str(next(self._ids))
                self.engine.add_request(rid, ids, p)
                out = CompletionOutput(i)
                result.outputs.append(out)
                owners[rid] = out
                by_rid[rid] = result
            results.append(result)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                owners[out.request_id].add(out)
                if owners[out.request_id].index == 0:  # the sample that looked the prompt up first
                    by_rid[out.request_id].num_cached_tokens = out.num_cached_tokens
                    if out.prompt_logprobs is not None:
                        by_rid[out.request_id].prompt_logprobs = out.prompt_logprobs
        return results

    def chat(self, messages, params: SamplingParams | list[SamplingParams] | None = None, **template_kwargs
             ) -> list[GenerationResult]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.tokenizer.apply_chat_template(m, tokenize=True, add_generation_prompt=True, return_dict=False,
                                               **template_kwargs)
            for m in conversations
        ]
        return self.generate(prompts, params)
