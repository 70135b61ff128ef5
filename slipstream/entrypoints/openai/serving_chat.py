"""POST /v1/chat/completions: messages -> chat template -> engine -> chat.completion(.chunk) objects."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from slipstream.engine.async_llm import AsyncLLM
from slipstream.engine.llm_engine import ReasoningSpan
from slipstream.engine.output_processor import RequestOutput
from slipstream.engine.sequence import TokenLogprobs
from slipstream.entrypoints.llm import CompletionOutput
from slipstream.entrypoints.openai.errors import APIError
from slipstream.entrypoints.openai.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatLogprobs,
    ChatMessage,
    ChatMessageIn,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    StreamOptions,
    TokenLogprob,
    ToolCall,
    TopLogprob,
)
from slipstream.entrypoints.openai.serving_engine import (
    OpenAIServing,
    ServingOptions,
    UsageCounter,
    clamp_logprob,
    off_loop,
    parse_body,
)
from slipstream.entrypoints.openai.tool_calling import plan_tools, template_renders_tools
from slipstream.reasoning import ReasoningParser, ReasoningStream
from slipstream.tools import ToolCallStream, ToolParser


def render_chat_text(tokenizer, messages: list[ChatMessageIn | dict[str, Any]], add_generation_prompt: bool = True,
                     chat_template: str | None = None, **template_kwargs: Any) -> str:
    """The conversation through the (model's or given) chat template."""
    try:
        return tokenizer.apply_chat_template(
            [m.template_dict() if isinstance(m, ChatMessageIn) else m for m in messages], chat_template=chat_template,
            tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs,
        )
    except Exception as exc:  # whatever a template raises (a TemplateError, a ZeroDivisionError, ...) is a 400
        raise APIError(f"the chat template failed on these messages: {type(exc).__name__}: {exc}",
                       param="messages") from exc


def thinking_span(parser: ReasoningParser, tokenizer, prompt_text: str) -> ReasoningSpan:
    """How the engine recognises `parser`'s thinking in the reply to `prompt_text`, to count its tokens
    and to end it at reasoning_max_tokens."""

    def ids(tag: str) -> list[int]:
        return tokenizer.encode(tag, add_special_tokens=False)

    opened = parser.implicit_start or parser.prompt_opens_thinking(prompt_text)
    return ReasoningSpan(ids(parser.end_tag), ids(parser.start_tag), opened_by_prompt=opened)


@dataclass
class _ChatSetup:
    """What one request's choices are read with."""

    reasoning: ReasoningParser | None
    prompt_opened: bool  # the prompt opened a thinking span
    tools: ToolParser | None
    max_calls: int | None  # parallel_tool_calls false: the first call only


def _tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _finish_reason(reason: str | None, has_calls: bool) -> str | None:
    return "tool_calls" if has_calls and reason == "stop" else reason


class _ChoiceStream:
    """One streamed choice: output deltas -> (reasoning, content, tool-call deltas), each piece handed
    out once, in the same split as the whole-text path (the parsers guarantee it)."""

    def __init__(self, setup: _ChatSetup) -> None:
        self.reasoning = setup.reasoning.stream(setup.prompt_opened) if setup.reasoning else None
        self.tools: ToolCallStream | None = setup.tools.stream() if setup.tools else None
        self.max_calls = setup.max_calls
        self.ids: dict[int, str] = {}

    def feed(self, out: RequestOutput) -> tuple[str, str, list[DeltaToolCall]]:
        reasoning, content = split_delta(self.reasoning, out)
        if self.tools is None:
            return reasoning, content, []
        content, deltas = self.tools.feed(content)
        if out.finished:
            more_content, more = self.tools.finish()
            content, deltas = content + more_content, deltas + more
        calls = []
        for d in deltas:
            if self.max_calls is not None and d.index >= self.max_calls:
                continue
            first = d.index not in self.ids
            if first:
                self.ids[d.index] = _tool_call_id()
            calls.append(DeltaToolCall(index=d.index, id=self.ids[d.index] if first else None,
                                       type="function" if first else None,
                                       function=DeltaFunctionCall(name=d.name, arguments=d.arguments)))
        return reasoning, content, calls


def split_delta(stream: ReasoningStream | None, out: RequestOutput) -> tuple[str, str]:
    """(reasoning, content) of one output delta; the last delta flushes what the parser held back."""
    if stream is None:
        return "", out.text
    reasoning, content = stream.feed(out.text)
    if out.finished:
        more_reasoning, more_content = stream.finish()
        reasoning, content = reasoning + more_reasoning, content + more_content
    return reasoning, content


class OpenAIServingChat(OpenAIServing):
    def __init__(self, llm: AsyncLLM, options: ServingOptions, reasoning_parser: ReasoningParser | None = None,
                 tool_call_parser: str | None = None) -> None:
        super().__init__(llm, options)
        self.reasoning_parser = reasoning_parser  # --reasoning-parser
        self.tool_call_parser = tool_call_parser  # --tool-call-parser
        self._renders_tools: dict[str | None, bool] = {}

    async def create(self, raw_request: Request) -> Response:
        request = parse_body(ChatCompletionRequest, await raw_request.body())
        return await self.respond(raw_request, request.stream, self.generate_chat(request))

    async def generate_chat(self, request: ChatCompletionRequest
                            ) -> ChatCompletionResponse | AsyncIterator[ChatCompletionStreamResponse]:
        """Run a chat request: the whole response, or (with `stream`) its chunks once the engine has
        taken it. Raises APIError before anything runs if the request cannot be served."""
        self.check_model(request)
        if request.chat_template is not None and not self.options.trust_request_chat_template:
            raise APIError("chat_template: this server uses its own chat template (start it with "
                           "--trust-request-chat-template to accept a request's)", param="chat_template")
        top_logprobs = (request.top_logprobs or 0) if request.logprobs else None
        self.check_logprobs(top_logprobs, "top_logprobs" if request.top_logprobs else "logprobs")
        self.check_logprobs(request.prompt_logprobs, "prompt_logprobs")
        # enable_thinking (default true) at the top level, overridden by chat_template_kwargs.
        template_kwargs = {"enable_thinking": request.enable_thinking is not False,
                           **(request.chat_template_kwargs or {})}
        tokenizer = self.llm.engine.tokenizer
        plan = plan_tools(request, self.renders_tools(request.chat_template), self.tool_call_parser)
        if plan.template_tools is not None:
            template_kwargs["tools"] = plan.template_tools

        def prompt_of_request() -> tuple[list[int], str | None]:
            if request.prompt_token_ids is not None:
                return request.prompt_token_ids, None
            if request.disable_chat_template:
                text = request.messages[0].content
                return self.encode(text, True, "messages"), text
            text = render_chat_text(tokenizer, plan.messages, chat_template=request.chat_template, **template_kwargs)
            return self.encode(text, False, "messages"), text

        prompt, prompt_text = await off_loop(prompt_of_request)
        # Without thinking the template closes it (or the model has none): the output is all answer.
        parser = self.reasoning_parser if template_kwargs["enable_thinking"] else None
        span = thinking_span(parser, tokenizer, prompt_text or tokenizer.decode(prompt)) if parser else None
        params = self.sampling_params(request, request.max_completion_tokens or request.max_tokens, top_logprobs,
                                      plan.structured_outputs)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        prompt_param = "messages" if request.prompt_token_ids is None else "prompt_token_ids"
        tags = {"endpoint": "chat", "stream": bool(request.stream), "tools": len(request.tools or [])}
        outputs = await self.generate(request_id, [prompt], params, prompt_param, span,
                                      request.max_streaming_response_tokens, tags)
        setup = _ChatSetup(parser, span is not None and span.opened_by_prompt, plan.parser,
                           None if request.parallel_tool_calls else 1)
        if request.stream:
            return self._stream(request, request_id, prompt, outputs, setup)
        return await self._complete(request, request_id, prompt, outputs, setup)

    def renders_tools(self, chat_template: str | None) -> bool:
        """Whether the (model's or request's) chat template shows tools to the model; cached per template."""
        if chat_template not in self._renders_tools:
            if len(self._renders_tools) >= 64:  # request templates (--trust-request-chat-template) are many
                del self._renders_tools[next(iter(self._renders_tools))]
            self._renders_tools[chat_template] = template_renders_tools(self.llm.engine.tokenizer, chat_template)
        return self._renders_tools[chat_template]

    def _logprobs(self, logprobs: list[TokenLogprobs], decode_tokens: bool) -> ChatLogprobs:
        decode = self.llm.engine.tokenizer.decode

        def entry(token_id: int, logprob: float) -> dict:
            if not decode_tokens:  # include_logprobs_decode_token false: ids' texts left out
                return {"token": "", "logprob": clamp_logprob(logprob), "bytes": None}
            text = decode([token_id])
            return {"token": text, "logprob": clamp_logprob(logprob), "bytes": list(text.encode())}

        return ChatLogprobs(content=[
            TokenLogprob(**entry(lp.token_id, lp.logprob), top_logprobs=[TopLogprob(**entry(*t)) for t in lp.top])
            for lp in logprobs
        ])

    async def _complete(self, request: ChatCompletionRequest, request_id: str, prompt: list[int],
                        outputs: AsyncIterator[tuple[int, RequestOutput]], setup: _ChatSetup
                        ) -> ChatCompletionResponse:
        choices = [CompletionOutput(i) for i in range(request.n)]
        usage = UsageCounter([prompt], request.n)
        prompt_logprobs = None
        async with aclosing(outputs):
            async for i, out in outputs:
                choices[i].add(out)
                usage.add(i, out)
                if out.prompt_logprobs is not None and prompt_logprobs is None:
                    prompt_logprobs = self.prompt_logprobs(out.prompt_logprobs, request.prompt_logprobs,
                                                           request.include_logprobs_decode_token)
        response_choices = []
        for c in choices:
            reasoning, content = (setup.reasoning.extract(c.text, setup.prompt_opened) if setup.reasoning
                                  else (None, c.text))
            calls = []
            if setup.tools is not None:
                content, parsed = setup.tools.extract(content or "")
                calls = [ToolCall(id=_tool_call_id(), function=FunctionCall(name=t.name, arguments=t.arguments))
                         for t in parsed[: setup.max_calls]]
            message = ChatMessage(content=content, reasoning_content=reasoning, tool_calls=calls)
            if request.return_token_ids:
                message.prompt_token_ids, message.completion_token_ids = prompt, c.token_ids
            logprobs = self._logprobs(c.logprobs or [], request.include_logprobs_decode_token) if request.logprobs \
                else None
            response_choices.append(ChatCompletionChoice(index=c.index, message=message, logprobs=logprobs,
                                                         finish_reason=_finish_reason(c.finish_reason, bool(calls))))
        return ChatCompletionResponse(id=request_id, model=self.options.model_name, choices=response_choices,
                                      usage=usage.info(), prompt_logprobs=prompt_logprobs)

    async def _stream(self, request: ChatCompletionRequest, request_id: str, prompt: list[int],
                      outputs: AsyncIterator[tuple[int, RequestOutput]], setup: _ChatSetup
                      ) -> AsyncIterator[ChatCompletionStreamResponse]:
        created = int(time.time())
        options = request.stream_options or StreamOptions()
        usage = UsageCounter([prompt], request.n)
        streams = [_ChoiceStream(setup) for _ in range(request.n)]

        def chunk(*choices: ChatCompletionStreamChoice) -> ChatCompletionStreamResponse:
            return ChatCompletionStreamResponse(id=request_id, created=created, model=self.options.model_name,
                                                choices=list(choices),
                                                usage=usage.info() if options.continuous_usage_stats else None)

        for i in range(request.n):
            delta = DeltaMessage(role="assistant", content="",
                                 prompt_token_ids=prompt if request.return_token_ids else None)
            yield chunk(ChatCompletionStreamChoice(index=i, delta=delta))
        prompt_logprobs_sent = False
        async with aclosing(outputs):
            async for i, out in outputs:
                usage.add(i, out)
                reasoning, content, calls = streams[i].feed(out)
                logprobs = self._logprobs(out.logprobs, request.include_logprobs_decode_token) \
                    if out.logprobs is not None else None
                # content stays a string ("" while thinking), as clients that print every delta expect.
                delta = DeltaMessage(content=content, reasoning_content=reasoning or None, tool_calls=calls or None,
                                     completion_token_ids=out.token_ids if request.return_token_ids else None)
                event = chunk(ChatCompletionStreamChoice(
                    index=i, delta=delta, logprobs=logprobs,
                    finish_reason=_finish_reason(out.finish_reason, bool(streams[i].ids)) if out.finished else None,
                    arrival_time=out.arrival_times[-1] if out.arrival_times else None,
                ))
                if out.prompt_logprobs is not None and not prompt_logprobs_sent:
                    event.prompt_logprobs = self.prompt_logprobs(out.prompt_logprobs, request.prompt_logprobs,
                                                                 request.include_logprobs_decode_token)
                    prompt_logprobs_sent = True
                yield event
        if options.include_usage:
            yield ChatCompletionStreamResponse(id=request_id, created=created, model=self.options.model_name,
                                               choices=[], usage=usage.info())
