"""What the chat and completions endpoints share: model-name and logprobs checks, request fields ->
SamplingParams, fan-out of n samples into engine requests, SSE framing and disconnect handling."""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from slipstream.engine.async_llm import AsyncLLM, EngineDeadError, EngineRequest
from slipstream.engine.llm_engine import ReasoningSpan
from slipstream.engine.output_processor import RequestOutput, merge_outputs
from slipstream.engine.sequence import TokenLogprobs
from slipstream.engine.structured_output import StructuredOutputError
from slipstream.entrypoints.llm import fan_out
from slipstream.entrypoints.openai.errors import APIError, from_exception, from_validation_error
from slipstream.entrypoints.openai.protocol import (
    CompletionTokensDetails,
    PromptLogprob,
    PromptLogprobs,
    PromptTokensDetails,
    SamplingRequest,
    UsageInfo,
)
from slipstream.sampling_params import SamplingParams, StructuredOutputsParams

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

# A grammar that takes longer than this to compile is refused (400), so a hostile schema cannot hold a request.
GRAMMAR_COMPILE_TIMEOUT_S = 30.0

# Logprobs may be -inf (a token masked out); JSON has no -inf, so it is reported as this, as vLLM does.
MIN_LOGPROB = -9999.0

_OPTIONAL_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "frequency_penalty",
                             "presence_penalty", "repetition_penalty", "reasoning_max_tokens", "response_max_tokens",
                             "prompt_logprobs")


@dataclass
class ServingOptions:
    model_name: str  # what responses call the model
    accepted_names: tuple[str, ...]  # --served-model-name: the names requests may give (others a 404); (): any
    enable_logprob: bool
    max_logprobs: int
    trust_request_chat_template: bool = False


def parse_body(model: type[M], body: bytes) -> M:
    """Validate a JSON body whatever its content type; every failure is a 400 naming the field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


# Chat templates render and prompts tokenize here, one at a time, so that a long prompt never holds the event
# loop (health checks, every other request's stream) for as long as it takes.
_PROMPT_WORKER = ThreadPoolExecutor(1, thread_name_prefix="slipstream-prompt")


async def off_loop(fn: Callable[[], T]) -> T:
    """`fn()` on the prompt worker thread."""
    return await asyncio.get_running_loop().run_in_executor(_PROMPT_WORKER, fn)


def _consume(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


@functools.cache
def _longest_token_bytes(tokenizer) -> int:
    """An upper bound on the bytes of text one token stands for: its vocabulary entry's UTF-8 length (a byte-level
    BPE's entries spell each byte as a character of 1-2 bytes, SentencePiece's a space as 3, byte tokens as 6)."""
    return max(len(token.encode()) for token in tokenizer.get_vocab())


def clamp_logprob(lp: float) -> float:
    return max(lp, MIN_LOGPROB) if not math.isnan(lp) else MIN_LOGPROB


async def until_disconnect(raw_request: Request, work: Awaitable[T]) -> T | Response:
    """Run `work`, cancelling it (and so aborting its engine requests) if the client goes away."""

    async def disconnected() -> None:
        while (await raw_request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    return Response(status_code=499)  # nobody is listening any more


def sse_response(events: AsyncIterator[BaseModel]) -> StreamingResponse:
    """Server-sent events `data: {json}` ending in `data: [DONE]`; a failure after the stream has started
    becomes an error event before the [DONE]."""

    async def frames() -> AsyncIterator[str]:
        try:
            async with aclosing(events):
                async for event in events:
                    yield f"data: {event.model_dump_json()}\n\n"
        except Exception as exc:
            yield from_exception(exc).sse()
        yield "data: [DONE]\n\n"

    return StreamingResponse(frames(), media_type="text/event-stream")


class UsageCounter:
    """Token counts of one API request: every prompt once, every choice's output."""

    def __init__(self, prompts: list[list[int]], n: int) -> None:
        self.n = n
        self.prompt_tokens = sum(map(len, prompts))
        self.completion_tokens = 0
        self.cached = [0] * len(prompts)  # per prompt, as its first sample found it
        self.reasoning: dict[int, int] = {}  # per choice

    def add(self, index: int, out: RequestOutput) -> None:
        self.completion_tokens += len(out.token_ids)
        if index % self.n == 0:
            self.cached[index // self.n] = out.num_cached_tokens
        self.reasoning[index] = out.num_reasoning_tokens

    def info(self) -> UsageInfo:
        return UsageInfo(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached)),
            completion_tokens_details=CompletionTokensDetails(reasoning_tokens=sum(self.reasoning.values())),
        )


class OpenAIServing:
    def __init__(self, llm: AsyncLLM, options: ServingOptions) -> None:
        self.llm = llm
        self.options = options

    @staticmethod
    async def respond(raw_request: Request, stream: bool, run: Awaitable) -> Response:
        """The HTTP answer of `run` (a generate_* call): its events as SSE, or its response as JSON unless
        the client goes away first."""
        result = await until_disconnect(raw_request, run)  # (a stream's first event may be a prompt's wait away)
        if isinstance(result, Response):
            return result
        return sse_response(result) if stream else JSONResponse(result.model_dump())

    def encode(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        """`text`'s token ids; a 400 at once for a text too long for any tokenization of it to fit the context,
        where tokenizing it (15 MB took 25 s) held the prompt worker, and every other request's prompt with it."""
        engine = self.llm.engine
        # A token stands for at most `longest` bytes of text, and a character is at least a byte: a text of more than
        # 4 x longest x max_model_len characters has over max_model_len tokens (4: room for normalizers that shrink
        # text, as NFKC turns a 3-byte fullwidth letter into 1 byte).
        longest = _longest_token_bytes(engine.tokenizer)
        if len(text) > 4 * longest * engine.max_model_len:
            raise APIError(f"This model's maximum context length is {engine.max_model_len} tokens, and {param} is "
                           f"{len(text)} characters long: more tokens than that; shorten it", param=param,
                           code="context_length_exceeded")
        return engine.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def check_model(self, request: SamplingRequest) -> None:
        # (no model named: the one served, as vLLM takes it)
        if self.options.accepted_names and request.model not in (None, *self.options.accepted_names):
            raise APIError(f"The model `{request.model}` does not exist.", status=404, param="model",
                           code="model_not_found")

    def check_logprobs(self, k: int | None, param: str) -> None:
        if k is None:
            return
        if not self.options.enable_logprob:
            raise APIError("logprobs are disabled on this server: start it with --enable-logprob", param=param)
        if k > self.options.max_logprobs:
            raise APIError(f"{param}: at most {self.options.max_logprobs} top logprobs (--max-logprobs), got {k}",
                           param=param)

    def sampling_params(self, request: SamplingRequest, max_tokens: int | None, logprobs: int | None,
                        structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
        """The engine's settings for `request`; `structured_outputs` overrides the request's own form."""
        optional = {f: v for f in _OPTIONAL_SAMPLING_FIELDS if (v := getattr(request, f)) is not None}
        if structured_outputs is None:
            try:
                structured_outputs = request.structured_output_spec()
            except ValueError as exc:
                raise APIError(str(exc), param="structured_outputs") from exc
        if "reasoning_max_tokens" in optional and max_tokens is not None:  # thinking is part of the output
            optional["reasoning_max_tokens"] = min(optional["reasoning_max_tokens"], max_tokens)
        try:
            return SamplingParams(
                n=request.n,
                max_tokens=max_tokens,
                min_tokens=request.min_tokens,
                stop=request.stop or [],
                stop_token_ids=request.stop_token_ids or [],
                include_stop_str_in_output=request.include_stop_str_in_output,
                ignore_eos=request.ignore_eos,
                bad_words=request.bad_words or [],
                bad_words_token_ids=request.bad_words_token_ids or [],
                logit_bias=request.logit_bias or {},
                logprobs=logprobs,
                structured_outputs=structured_outputs,
                **optional,
            )
        except ValueError as exc:  # (SamplingParams' messages start with the setting's name)
            name = str(exc).split(" ", 1)[0]
            raise APIError(str(exc), param=name if name in type(request).model_fields else None,
                           code="invalid_value") from exc

    async def generate(self, request_id: str, prompts: list[list[int]], params: SamplingParams, prompt_param: str,
                       reasoning: ReasoningSpan | None = None, group_tokens: int | None = None,
                       tags: dict[str, object] | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Start every prompt x n samples (each with the thinking span `reasoning`, if any); returns the
        stream of (choice index, output delta), each delta holding at least `group_tokens` tokens (but a
        choice's last) when given. Choice index = prompt index * n + sample index, as OpenAI numbers them.
        `tags`: what the dashboard shows of the request (its endpoint, ...)."""
        spec = params.structured_outputs
        grammar = self.llm.engine.structured_output.compile(spec) if spec is not None else None
        samples = fan_out(params)
        index: dict[str, int] = {}
        requests = []
        for p, prompt in enumerate(prompts):
            for s, sample_params in enumerate(samples):
                rid = f"{request_id}-{p * len(samples) + s}"
                index[rid] = p * len(samples) + s
                requests.append(EngineRequest(rid, prompt, sample_params, reasoning, tags, request_id))
        try:
            outputs = await self.llm.generate(requests)
        except Exception as exc:
            raise from_exception(exc, prompt_param) from exc
        if grammar is not None:  # compiled meanwhile, overlapping the prefill; a refused one is a 400
            await self._check_grammar(grammar, spec, [r.request_id for r in requests])

        async def indexed() -> AsyncIterator[tuple[int, RequestOutput]]:
            held: dict[int, RequestOutput] = {}  # per choice, tokens not yet handed out (group_tokens)
            async with aclosing(outputs):
                async for out in outputs:
                    i = index[out.request_id]
                    if i in held:
                        out = merge_outputs(held.pop(i), out)
                    if group_tokens is not None and not out.finished and len(out.token_ids) < group_tokens:
                        held[i] = out
                        continue
                    yield i, out

        return indexed()

    def prompt_logprobs(self, logprobs: list[TokenLogprobs | None], k: int, decode_tokens: bool) -> PromptLogprobs:
        """vLLM's prompt_logprobs: per prompt token (None for the first), its own and the top-k tokens."""
        decode = self.llm.engine.tokenizer.decode
        result: PromptLogprobs = []
        for lp in logprobs:
            if lp is None:
                result.append(None)
                continue
            entries: dict[int, PromptLogprob] = {}
            for t, v, r in [(lp.token_id, lp.logprob, lp.rank), *((t, v, r) for r, (t, v) in enumerate(lp.top[:k], 1))]:
                entries.setdefault(t, PromptLogprob(logprob=clamp_logprob(v), rank=r,
                                                    decoded_token=decode([t]) if decode_tokens else None))
            result.append(entries)
        return result

    async def _check_grammar(self, grammar: Future, spec: StructuredOutputsParams, request_ids: list[str]) -> None:
        """Wait for the grammar to compile; if it fails or takes too long, end the requests and raise a 400."""
        waiting = asyncio.wrap_future(grammar)
        waiting.add_done_callback(_consume)  # the error is read from `grammar`; this copy of it must not be logged
        done, _ = await asyncio.wait({waiting}, timeout=GRAMMAR_COMPILE_TIMEOUT_S)
        if done and not grammar.cancelled() and grammar.exception() is None:
            return
        self.llm.abort(request_ids)
        if not done:
            raise APIError(f"{spec.param}: the {spec.kind.replace('_', ' ')} did not compile within "
                           f"{GRAMMAR_COMPILE_TIMEOUT_S:.0f} s", param=spec.param)
        exc = grammar.exception() if not grammar.cancelled() else EngineDeadError("the server is shutting down")
        if isinstance(exc, StructuredOutputError):
            raise APIError(f"{spec.param}: {exc}", param=spec.param) from exc
        raise from_exception(exc) from exc
