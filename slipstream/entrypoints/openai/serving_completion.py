"""POST /v1/completions: prompt(s) as text or token ids -> engine -> text_completion objects, with the
legacy logprobs format and echo."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from functools import partial

from fastapi import Request
from fastapi.responses import Response

from slipstream.engine.llm_engine import TokenIdError
from slipstream.engine.output_processor import RequestOutput
from slipstream.engine.sequence import TokenLogprobs
from slipstream.entrypoints.llm import CompletionOutput
from slipstream.entrypoints.openai.errors import from_exception
from slipstream.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptLogprobs,
    StreamOptions,
)
from slipstream.entrypoints.openai.serving_engine import (
    OpenAIServing,
    UsageCounter,
    clamp_logprob,
    off_loop,
    parse_body,
)


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, raw_request: Request) -> Response:
        request = parse_body(CompletionRequest, await raw_request.body())
        return await self.respond(raw_request, request.stream, self.generate_completion(request))

    async def generate_completion(self, request: CompletionRequest
                                  ) -> CompletionResponse | AsyncIterator[CompletionResponse]:
        """Run a completions request: the whole response, or (with `stream`) its chunks once the engine
        has taken it. Raises APIError before anything runs if the request cannot be served."""
        self.check_model(request)
        self.check_logprobs(request.logprobs, "logprobs")
        self.check_logprobs(request.prompt_logprobs, "prompt_logprobs")
        prompts, texts = await off_loop(partial(self._prompts, request))
        params = self.sampling_params(request, request.max_tokens, request.logprobs)
        if request.echo and request.logprobs is not None:  # the echoed prompt carries its logprobs too
            params.prompt_logprobs = max(request.logprobs, request.prompt_logprobs or 0)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        outputs = await self.generate(request_id, prompts, params,
                                      "prompt" if request.prompt_token_ids is None else "prompt_token_ids",
                                      group_tokens=request.max_streaming_response_tokens,
                                      tags={"endpoint": "completions", "stream": bool(request.stream)})
        echoes = [texts[i // request.n] if request.echo else "" for i in range(len(prompts) * request.n)]
        if request.stream:
            return self._stream(request, request_id, prompts, echoes, outputs)
        return await self._complete(request, request_id, prompts, echoes, outputs)

    def _prompts(self, request: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        """(token ids, text) of every prompt; `prompt_token_ids` overrides `prompt`."""
        tokenizer = self.llm.engine.tokenizer
        prompt = request.prompt if request.prompt_token_ids is None else request.prompt_token_ids
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        vocab = self.llm.engine.hf_config.vocab_size
        if any(not isinstance(p, str) and any(t >= vocab for t in p) for p in prompt):  # before decode sees them
            raise from_exception(TokenIdError("prompt", vocab),
                                 "prompt" if request.prompt_token_ids is None else "prompt_token_ids")
        ids = [self.encode(p, True, "prompt") if isinstance(p, str) else p for p in prompt]
        texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompt]
        return ids, texts

    def _logprobs(self, logprobs: list[TokenLogprobs | None], offset: int, token_ids: list[int] | None = None,
                  k: int | None = None) -> CompletionLogprobs:
        """Legacy format; `offset` is where the first of these tokens starts in the choice's text. A None
        entry (the first prompt token, which nothing scores) takes its token from `token_ids`. At most `k`
        alternatives each (the prompt's may have been scored for a larger prompt_logprobs)."""
        decode = self.llm.engine.tokenizer.decode
        result = CompletionLogprobs()
        for i, lp in enumerate(logprobs):
            token = decode([token_ids[i] if lp is None else lp.token_id])
            result.tokens.append(token)
            result.text_offset.append(offset)
            offset += len(token)
            if lp is None:
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            result.token_logprobs.append(clamp_logprob(lp.logprob))
            result.top_logprobs.append({token: clamp_logprob(lp.logprob)}
                                       | {decode([t]): clamp_logprob(v) for t, v in lp.top[:k]})
        return result

    def _echo_logprobs(self, request: CompletionRequest, prompt: list[int], out: RequestOutput) -> CompletionLogprobs:
        return self._logprobs(out.prompt_logprobs, 0, prompt, request.logprobs)

    def _prompt_logprobs(self, request: CompletionRequest, out: RequestOutput) -> PromptLogprobs | None:
        if request.prompt_logprobs is None or out.prompt_logprobs is None:
            return None
        return self.prompt_logprobs(out.prompt_logprobs, request.prompt_logprobs, request.include_logprobs_decode_token)

    async def _complete(self, request: CompletionRequest, request_id: str, prompts: list[list[int]],
                        echoes: list[str], outputs: AsyncIterator[tuple[int, RequestOutput]]) -> CompletionResponse:
        choices = [CompletionOutput(i) for i in range(len(echoes))]
        echo_logprobs: dict[int, CompletionLogprobs] = {}
        prompt_logprobs: dict[int, PromptLogprobs] = {}
        usage = UsageCounter(prompts, request.n)
        async with aclosing(outputs):
            async for i, out in outputs:
                choices[i].add(out)
                usage.add(i, out)
                if out.prompt_logprobs is not None and request.echo and request.logprobs is not None:
                    echo_logprobs[i] = self._echo_logprobs(request, prompts[i // request.n], out)
                if (entries := self._prompt_logprobs(request, out)) is not None:
                    prompt_logprobs[i] = entries
        response_choices = []
        for c in choices:
            choice = CompletionChoice(index=c.index, text=echoes[c.index] + c.text, finish_reason=c.finish_reason,
                                      prompt_logprobs=prompt_logprobs.get(c.index))
            if request.logprobs is not None:
                choice.logprobs = self._logprobs(c.logprobs or [], len(echoes[c.index]))
                if c.index in echo_logprobs:
                    echoed = echo_logprobs[c.index]
                    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                        setattr(choice.logprobs, field, getattr(echoed, field) + getattr(choice.logprobs, field))
            if request.return_token_ids:
                choice.prompt_token_ids, choice.completion_token_ids = prompts[c.index // request.n], c.token_ids
            response_choices.append(choice)
        return CompletionResponse(id=request_id, model=self.options.model_name, choices=response_choices,
                                  usage=usage.info())

    async def _stream(self, request: CompletionRequest, request_id: str, prompts: list[list[int]],
                      echoes: list[str], outputs: AsyncIterator[tuple[int, RequestOutput]]
                      ) -> AsyncIterator[CompletionResponse]:
        created = int(time.time())
        options = request.stream_options or StreamOptions()
        usage = UsageCounter(prompts, request.n)
        offsets = [len(e) for e in echoes]  # text_offset of each choice's next token

        def chunk(*choices: CompletionChoice) -> CompletionResponse:
            return CompletionResponse(id=request_id, created=created, model=self.options.model_name,
                                      choices=list(choices),
                                      usage=usage.info() if options.continuous_usage_stats else None)

        if request.echo or request.return_token_ids:
            for i, echo in enumerate(echoes):
                prompt_ids = prompts[i // request.n] if request.return_token_ids else None
                yield chunk(CompletionChoice(index=i, text=echo, prompt_token_ids=prompt_ids))
        async with aclosing(outputs):
            async for i, out in outputs:
                usage.add(i, out)
                choice = CompletionChoice(
                    index=i, text=out.text, finish_reason=out.finish_reason if out.finished else None,
                    arrival_time=out.arrival_times[-1] if out.arrival_times else None,
                    completion_token_ids=out.token_ids if request.return_token_ids else None,
                    prompt_logprobs=self._prompt_logprobs(request, out),
                )
                if out.prompt_logprobs is not None and request.echo and request.logprobs is not None:
                    # the echoed prompt's chunk came first; its logprobs now
                    yield chunk(CompletionChoice(index=i, text="", logprobs=self._echo_logprobs(
                        request, prompts[i // request.n], out)))
                if out.logprobs is not None:
                    choice.logprobs = self._logprobs(out.logprobs, offsets[i])
                    offsets[i] += sum(map(len, choice.logprobs.tokens))
                yield chunk(choice)
        if options.include_usage:
            yield CompletionResponse(id=request_id, created=created, model=self.options.model_name, choices=[],
                                     usage=usage.info())
