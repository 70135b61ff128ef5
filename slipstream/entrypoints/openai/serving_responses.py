"""POST /v1/responses (OpenAI's Responses API) on top of the chat endpoint: input items -> chat messages ->
`OpenAIServingChat.generate_chat` -> output items, as the `openai` package's own response and stream event
types. Finished responses are kept (store, the default) in a bounded in-memory LRU, for
GET/DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items and for chaining with previous_response_id.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from openai import BaseModel as SDKModel
from openai.types.responses import (
    FunctionTool,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseErrorEvent,
    ResponseFormatTextJSONSchemaConfig,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseFunctionToolCall,
    ResponseFunctionToolCallItem,
    ResponseFunctionToolCallOutputItem,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseInputMessageItem,
    ResponseInputText,
    ResponseItemList,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseReasoningItem,
    ResponseReasoningTextDeltaEvent,
    ResponseReasoningTextDoneEvent,
    ResponseTextConfig,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    ResponseUsage,
    ToolChoiceFunction,
)
from openai.types.responses import Response as SDKResponse
from openai.types.responses.response import IncompleteDetails
from openai.types.responses.response_content_part_added_event import PartReasoningText as AddedReasoningPart
from openai.types.responses.response_content_part_done_event import PartReasoningText as DoneReasoningPart
from openai.types.responses.response_output_text import Logprob, LogprobTopLogprob
from openai.types.responses.response_reasoning_item import Content as ReasoningContent
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails
from openai.types.shared import Reasoning, ResponseFormatJSONObject, ResponseFormatText
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from slipstream.entrypoints.openai.errors import APIError, from_exception, from_validation_error
from slipstream.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatLogprobs,
    UsageInfo,
)
from slipstream.entrypoints.openai.serving_chat import OpenAIServingChat
from slipstream.entrypoints.openai.serving_engine import parse_body, until_disconnect

# How many finished responses `store` keeps (least recently used go first).
MAX_STORED_RESPONSES = 1000

# Fields of the chat request that a Responses request may also carry (as vLLM's Responses endpoint does);
# chat validates them and its errors name them as given.
PASS_THROUGH_FIELDS = ("seed", "top_k", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty",
                       "stop", "stop_token_ids", "min_tokens", "ignore_eos", "logit_bias", "bad_words",
                       "reasoning_max_tokens", "response_max_tokens", "bad_words_token_ids", "enable_thinking",
                       "chat_template_kwargs")

# A chat parameter that failed -> the Responses parameter it came from.
_CHAT_TO_RESPONSES_PARAM = {"messages": "input", "max_completion_tokens": "max_output_tokens",
                            "max_tokens": "max_output_tokens", "response_format": "text", "logprobs": "include"}

# `include` asks for the answer's token logprobs so (and `top_logprobs` for alternatives); its other values name
# outputs of OpenAI's hosted tools, which nothing here produces: accepted, as OpenAI's clients send them.
INCLUDE_LOGPROBS = "message.output_text.logprobs"
MAX_INPUT_ITEMS_PAGE = 100  # GET /v1/responses/{id}/input_items: most items a page (OpenAI's limit)


# ---- the request ----


class TextContent(BaseModel):
    type: Literal["input_text", "output_text"]
    text: str


def _text_of(content: str | list[TextContent]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


class MessageItem(BaseModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextContent]


class FunctionCallItem(BaseModel):
    type: Literal["function_call"]
    call_id: Annotated[str, StringConstraints(min_length=1)]
    name: Annotated[str, StringConstraints(min_length=1)]
    arguments: str  # JSON text, as the model wrote it


class FunctionCallOutputItem(BaseModel):
    type: Literal["function_call_output"]
    call_id: Annotated[str, StringConstraints(min_length=1)]
    output: str | list[TextContent]


class ReasoningInputItem(BaseModel):
    """A reasoning item sent back as input: accepted and ignored (the chat template drops past thinking)."""

    type: Literal["reasoning"]


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningInputItem
_ITEM_TYPES: dict[str, type[BaseModel]] = {"message": MessageItem, "function_call": FunctionCallItem,
                                           "function_call_output": FunctionCallOutputItem,
                                           "reasoning": ReasoningInputItem}


def _error_text(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def parse_input_items(value: Any) -> str | list[InputItem]:
    """`input`: a string (one user message) or a list of items; a message may leave out its type."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError("must be a string or a list of input items")
    items: list[InputItem] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValueError(f"item {i} must be an object, got {type(item).__name__}")
        kind = item.get("type", "message")
        model = _ITEM_TYPES.get(kind) if isinstance(kind, str) else None
        if model is None:
            raise ValueError(f"item {i}: unsupported input item type {kind!r} (supported: {', '.join(_ITEM_TYPES)})")
        try:
            items.append(model.model_validate(item))
        except ValidationError as exc:
            raise ValueError(f"item {i} ({kind}): {_error_text(exc)}") from None
    return items


class FunctionToolIn(BaseModel):
    """A function tool in the Responses' flat shape."""

    type: Literal["function"]
    name: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunctionIn(BaseModel):
    type: Literal["function"]
    name: str


class TextFormatText(BaseModel):
    type: Literal["text"]


class TextFormatJsonSchema(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    type: Literal["json_schema"]
    name: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextFormatJsonObject(BaseModel):
    type: Literal["json_object"]


class TextConfig(BaseModel):
    format: Annotated[TextFormatText | TextFormatJsonSchema | TextFormatJsonObject,
                      Field(discriminator="type")] | None = None


class ReasoningConfig(BaseModel):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


MetadataKey = Annotated[str, StringConstraints(max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class ResponsesRequest(BaseModel):
    """The body of POST /v1/responses. Unknown fields are ignored; chat's extra sampling fields
    (PASS_THROUGH_FIELDS) are passed on to the chat request."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    tools: list[FunctionToolIn] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunctionIn | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)] | None = None
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input_items(cls, value: Any) -> Any:
        return parse_input_items(value)

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            for i, tool in enumerate(value):
                kind = tool.get("type") if isinstance(tool, dict) else None
                if kind != "function":
                    raise ValueError(f"item {i}: only function tools are supported, got type {kind!r}")
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _function_choice_only(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") != "function":
            raise ValueError("must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}, "
                             f"got type {value.get('type')!r}")
        return value


# ---- input items -> chat messages ----


def items_to_messages(items: list[InputItem] | list[dict], base: list[dict] | None = None) -> list[dict]:
    """Chat messages (dicts for ChatMessageIn) of input items, appended to a copy of `base`. Function calls
    join the assistant message just before them (consecutive calls: one message with every call);
    function call outputs become tool messages; reasoning items are dropped."""
    messages = [dict(m) for m in base or []]
    for item in items:
        if isinstance(item, dict):
            item = parse_input_items([item])[0]
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": _text_of(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if messages and messages[-1]["role"] == "assistant":
                last = messages[-1]
                last["tool_calls"] = [*last.get("tool_calls", []), call]
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _text_of(item.output)})
    return messages


def listed_input_items(items: str | list[InputItem]) -> list[Any]:
    """A request's input items as GET /v1/responses/{id}/input_items lists them: with ids, as the SDK's types
    (reasoning items sent back are dropped, as they are from the conversation)."""
    listed: list[Any] = []
    for item in [MessageItem(role="user", content=items)] if isinstance(items, str) else items:
        if isinstance(item, MessageItem):
            text = _text_of(item.content)
            if item.role == "assistant":
                listed.append(message_item(_new_id("msg"), text))
            else:
                listed.append(ResponseInputMessageItem(
                    id=_new_id("msg"), type="message", role=item.role, status="completed",
                    content=[ResponseInputText(type="input_text", text=text)]))
        elif isinstance(item, FunctionCallItem):
            listed.append(ResponseFunctionToolCallItem(id=_new_id("fc"), type="function_call", call_id=item.call_id,
                                                       name=item.name, arguments=item.arguments, status="completed"))
        elif isinstance(item, FunctionCallOutputItem):
            listed.append(ResponseFunctionToolCallOutputItem(id=_new_id("fco"), type="function_call_output",
                                                             call_id=item.call_id, output=_text_of(item.output),
                                                             status="completed"))
    return listed


class ResponseObject(SDKResponse):
    """The SDK's Response with OpenAI's integer timestamps: the SDK types them float, and 1796514499.0 breaks strictly
    typed clients (Rust's async-openai reads a u64). Dumped in events with serialize_as_any, to keep its fields'."""

    created_at: int
    completed_at: int | None = None


# ---- what is kept ----


@dataclass
class StoredResponse:
    response: SDKResponse
    conversation: list[dict]  # chat messages it saw and produced, without its instructions
    input_items: list[Any]  # its request's input, as listed_input_items gives it


class ResponseStore:
    """A bounded LRU of finished responses, in memory (lost with the process)."""

    def __init__(self, capacity: int = MAX_STORED_RESPONSES) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, stored: StoredResponse) -> None:
        self._items[stored.response.id] = stored
        self._items.move_to_end(stored.response.id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._items.get(response_id)
        if stored is not None:
            self._items.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        return self._items.pop(response_id, None) is not None


def _not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(f"Response with id '{response_id}' not found.", status=404, param=param, code="not_found")


def _dump(model: SDKModel) -> dict:
    return model.model_dump(mode="json", by_alias=True, exclude_unset=True, serialize_as_any=True)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _usage(usage: UsageInfo | None) -> ResponseUsage | None:
    if usage is None:
        return None
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    reasoning = usage.completion_tokens_details.reasoning_tokens if usage.completion_tokens_details else 0
    return ResponseUsage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                         total_tokens=usage.total_tokens,
                         input_tokens_details=InputTokensDetails(cached_tokens=cached, cache_write_tokens=0),
                         output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning))


def _event_logprobs(logprobs: list[Logprob]) -> list[dict]:
    """Those of an output_text delta / done event: without bytes (the events' type has none)."""
    return [lp.model_dump(exclude={"bytes": True, "top_logprobs": {"__all__": {"bytes"}}}) for lp in logprobs]


def _remap(err: APIError) -> APIError:
    """A chat error, named by the Responses parameter it came from."""
    name = _CHAT_TO_RESPONSES_PARAM.get(err.param or "")
    if name is not None:
        if err.message.startswith(f"{err.param}"):
            err.message = name + err.message[len(err.param):]
        err.param = name
    return err


class _Output:
    """The output items of one response as they stream: events for each piece, and the finished items."""

    def __init__(self) -> None:
        self.sequence = 0
        self.items: list[Any] = []  # finished output items
        self.kind: str | None = None  # the open item: "reasoning" | "message" | "function_call"
        self.item_id = ""
        self.buffer = ""  # its text or arguments so far
        self.logprobs: list[Logprob] = []  # an open message's, so far
        self.call: tuple[str, str] | None = None  # (call_id, name) of an open function call
        self.tool_index: int | None = None  # chat's index of the open function call
        self.status = "in_progress"  # then completed / incomplete
        self.usage: UsageInfo | None = None

    def event(self, cls: type[SDKModel], **fields: Any) -> SDKModel:
        event = cls(sequence_number=self.sequence, **fields)
        self.sequence += 1
        return event

    @property
    def index(self) -> int:
        return len(self.items)  # the open item's output_index

    def has(self, kind: str) -> bool:
        return self.kind == kind or any(item.type == kind for item in self.items)

    def open(self, kind: str, call: tuple[str, str] | None = None) -> list[SDKModel]:
        self.kind, self.buffer, self.call, self.logprobs = kind, "", call, []
        if kind == "reasoning":
            self.item_id = _new_id("rs")
            item = ResponseReasoningItem(id=self.item_id, type="reasoning", summary=[], content=[],
                                         status="in_progress")
            part = AddedReasoningPart(type="reasoning_text", text="")
        elif kind == "message":
            self.item_id = _new_id("msg")
            item = ResponseOutputMessage(id=self.item_id, type="message", role="assistant", content=[],
                                         status="in_progress")
            part = ResponseOutputText(type="output_text", text="", annotations=[], logprobs=[])
        else:
            self.item_id = _new_id("fc")
            item = ResponseFunctionToolCall(id=self.item_id, type="function_call", call_id=call[0], name=call[1],
                                            arguments="", status="in_progress")
            part = None
        events = [self.event(ResponseOutputItemAddedEvent, type="response.output_item.added", item=item,
                             output_index=self.index)]
        if part is not None:
            events.append(self.event(ResponseContentPartAddedEvent, type="response.content_part.added",
                                     item_id=self.item_id, output_index=self.index, content_index=0, part=part))
        return events

    def delta(self, text: str, logprobs: list[Logprob] = ()) -> list[SDKModel]:
        self.buffer += text
        where = {"item_id": self.item_id, "output_index": self.index}
        if self.kind == "reasoning":
            return [self.event(ResponseReasoningTextDeltaEvent, type="response.reasoning_text.delta",
                               content_index=0, delta=text, **where)]
        if self.kind == "message":
            self.logprobs += logprobs
            return [self.event(ResponseTextDeltaEvent, type="response.output_text.delta", content_index=0,
                               delta=text, logprobs=_event_logprobs(logprobs), **where)]
        return [self.event(ResponseFunctionCallArgumentsDeltaEvent, type="response.function_call_arguments.delta",
                           delta=text, **where)]

    def feed(self, kind: str, text: str, call: tuple[str, str] | None = None,
             logprobs: list[Logprob] = ()) -> list[SDKModel]:
        """A piece of `kind` (a message's with its tokens' logprobs): opens its item (closing another open one)
        when needed."""
        events = []
        if self.kind != kind or call is not None:
            events += self.close()
            events += self.open(kind, call)
        if text:
            events += self.delta(text, logprobs)
        return events

    def close(self, status: str = "completed") -> list[SDKModel]:
        """Finish the open item, if any."""
        if self.kind is None:
            return []
        where = {"item_id": self.item_id, "output_index": self.index}
        text = self.buffer
        if self.kind == "reasoning":
            item = reasoning_item(self.item_id, text, status)
            events = [self.event(ResponseReasoningTextDoneEvent, type="response.reasoning_text.done",
                                 content_index=0, text=text, **where),
                      self.event(ResponseContentPartDoneEvent, type="response.content_part.done", content_index=0,
                                 part=DoneReasoningPart(type="reasoning_text", text=text), **where)]
        elif self.kind == "message":
            item = message_item(self.item_id, text, status, self.logprobs)
            events = [self.event(ResponseTextDoneEvent, type="response.output_text.done", content_index=0,
                                 text=text, logprobs=_event_logprobs(self.logprobs), **where),
                      self.event(ResponseContentPartDoneEvent, type="response.content_part.done", content_index=0,
                                 part=item.content[0], **where)]
        else:
            item = function_call_item(self.item_id, *self.call, text, status)
            events = [self.event(ResponseFunctionCallArgumentsDoneEvent, type="response.function_call_arguments.done",
                                 arguments=text, **where)]
        events.append(self.event(ResponseOutputItemDoneEvent, type="response.output_item.done", item=item,
                                 output_index=self.index))
        self.items.append(item)
        self.kind, self.call, self.tool_index = None, None, None
        return events


def reasoning_item(item_id: str, text: str, status: str = "completed") -> ResponseReasoningItem:
    return ResponseReasoningItem(id=item_id, type="reasoning", summary=[],
                                 content=[ReasoningContent(type="reasoning_text", text=text)], status=status)


def message_item(item_id: str, text: str, status: str = "completed",
                 logprobs: list[Logprob] | None = None) -> ResponseOutputMessage:
    return ResponseOutputMessage(id=item_id, type="message", role="assistant", status=status,
                                 content=[ResponseOutputText(type="output_text", text=text, annotations=[],
                                                             logprobs=logprobs or [])])


def function_call_item(item_id: str, call_id: str, name: str, arguments: str,
                       status: str = "completed") -> ResponseFunctionToolCall:
    return ResponseFunctionToolCall(id=item_id, type="function_call", call_id=call_id, name=name,
                                    arguments=arguments, status=status)


class OpenAIServingResponses:
    """POST /v1/responses, GET and DELETE /v1/responses/{response_id}, GET /v1/responses/{response_id}/input_items,
    over the chat endpoint."""

    def __init__(self, chat: OpenAIServingChat, store_capacity: int = MAX_STORED_RESPONSES) -> None:
        self.chat = chat
        self.store = ResponseStore(store_capacity)

    @functools.cached_property
    def end_tokens(self) -> frozenset[str]:
        """The texts of the model's end tokens, as chat's logprobs name them (known once the model is loaded)."""
        engine = self.chat.llm.engine
        return frozenset(engine.tokenizer.decode([token]) for token in engine.eos_token_ids)

    def logprobs(self, chat: ChatLogprobs | None) -> list[Logprob]:
        """Chat's token logprobs in the Responses' shape (a token's bytes: [] where chat leaves them out), those of
        the output text's tokens only: chat's, as vLLM's, also hold the end token (`<|im_end|>`) it stopped on."""
        if chat is None:
            return []
        return [Logprob(token=t.token, bytes=t.bytes or [], logprob=t.logprob,
                        top_logprobs=[LogprobTopLogprob(token=a.token, bytes=a.bytes or [], logprob=a.logprob)
                                      for a in t.top_logprobs])
                for t in chat.content if t.token not in self.end_tokens]

    # ---- routes ----

    async def create(self, raw_request: Request) -> Response:
        request = parse_body(ResponsesRequest, await raw_request.body())
        work = self.generate_stream(request) if request.stream else self.generate_response(request)
        result = await until_disconnect(raw_request, work)
        if isinstance(result, Response):
            return result
        return _sse(result) if request.stream else JSONResponse(_dump(result))

    async def retrieve(self, response_id: str) -> Response:
        stored = self.store.get(response_id)
        if stored is None:
            raise _not_found(response_id)
        return JSONResponse(_dump(stored.response))

    async def input_items(self, response_id: str, limit: int = 20, order: str = "desc",
                          after: str | None = None) -> Response:
        """The request's input items, a page at a time (`after`: the last id of the page before), as OpenAI lists
        them: newest first unless `order` is asc."""
        stored = self.store.get(response_id)
        if stored is None:
            raise _not_found(response_id)
        if not 1 <= limit <= MAX_INPUT_ITEMS_PAGE:
            raise APIError(f"limit must be between 1 and {MAX_INPUT_ITEMS_PAGE}, got {limit}", param="limit",
                           code="invalid_value")
        if order not in ("asc", "desc"):
            raise APIError(f"order must be 'asc' or 'desc', got {order!r}", param="order", code="invalid_value")
        items = stored.input_items if order == "asc" else stored.input_items[::-1]
        if after is not None:
            ids = [item.id for item in items]
            if after not in ids:
                raise APIError(f"No input item with id '{after}' in response '{response_id}'.", status=404,
                               param="after", code="not_found")
            items = items[ids.index(after) + 1:]
        page = items[:limit]
        return JSONResponse(_dump(ResponseItemList(
            object="list", data=page, first_id=page[0].id if page else "", last_id=page[-1].id if page else "",
            has_more=len(items) > limit)))

    async def delete(self, response_id: str) -> Response:
        if not self.store.delete(response_id):
            raise _not_found(response_id)
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})

    # ---- the work ----

    async def _run_chat(self, request: ResponsesRequest) -> tuple[str, int, list[dict], Any]:
        """(response id, creation time, conversation, chat's result) of a Responses request; chat's errors
        are named by the Responses parameters."""
        response_id, created = _new_id("resp"), int(time.time())
        chat_request, conversation = self.chat_request(request)
        try:
            return response_id, created, conversation, await self.chat.generate_chat(chat_request)
        except APIError as exc:
            raise _remap(exc) from None

    async def generate_response(self, request: ResponsesRequest) -> SDKResponse:
        """The whole response (and kept, with `store`). Raises APIError if the request cannot be served."""
        response_id, created, conversation, result = await self._run_chat(request)
        assert isinstance(result, ChatCompletionResponse)
        choice = result.choices[0]
        message = choice.message
        incomplete = choice.finish_reason == "length"
        output: list[Any] = []
        if message.reasoning_content:
            output.append(reasoning_item(_new_id("rs"), message.reasoning_content))
        if message.content or not message.tool_calls:
            output.append(message_item(_new_id("msg"), message.content or "", "completed",
                                       self.logprobs(choice.logprobs)))
        output += [function_call_item(_new_id("fc"), call.id, call.function.name, call.function.arguments)
                   for call in message.tool_calls]
        if incomplete:
            output[-1].status = "incomplete"
        response = self._response(request, response_id, created, "incomplete" if incomplete else "completed",
                                  output, result.usage)
        self._keep(request, response, conversation)
        return response

    async def generate_stream(self, request: ResponsesRequest) -> AsyncIterator[SDKModel]:
        """The response's stream events, once the engine has taken the request. Raises APIError before
        anything runs if the request cannot be served."""
        response_id, created, conversation, chunks = await self._run_chat(request)
        return self._events(request, response_id, created, conversation, chunks)

    def chat_request(self, request: ResponsesRequest) -> tuple[ChatCompletionRequest, list[dict]]:
        """The chat request of a Responses request, and the conversation it continues (the previous
        response's messages and the new input items; not the instructions, which OpenAI does not carry)."""
        base: list[dict] = []
        if request.previous_response_id is not None:
            previous = self.store.get(request.previous_response_id)
            if previous is None:
                raise _not_found(request.previous_response_id, param="previous_response_id")
            base = previous.conversation
        items = [MessageItem(role="user", content=request.input)] if isinstance(request.input, str) else request.input
        conversation = items_to_messages(items, base)
        messages = ([{"role": "system", "content": request.instructions}] if request.instructions else [])
        messages += conversation
        if not messages:
            raise APIError("input has no messages", param="input", code="invalid_value")
        body: dict[str, Any] = {
            "model": request.model, "messages": messages, "max_completion_tokens": request.max_output_tokens,
            "temperature": request.temperature, "top_p": request.top_p, "user": request.user,
            "stream": request.stream, "stream_options": {"include_usage": True} if request.stream else None,
        }
        if INCLUDE_LOGPROBS in (request.include or ()):
            body["logprobs"], body["top_logprobs"] = True, request.top_logprobs
        if request.tools:
            body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                             for t in request.tools]
            body["parallel_tool_calls"] = request.parallel_tool_calls
        if isinstance(request.tool_choice, ToolChoiceFunctionIn):
            body["tool_choice"] = {"type": "function", "function": {"name": request.tool_choice.name}}
        else:
            body["tool_choice"] = request.tool_choice
        fmt = request.text.format if request.text else None
        if isinstance(fmt, TextFormatJsonSchema):
            body["response_format"] = {"type": "json_schema", "json_schema": fmt.model_dump(
                exclude={"type"}, exclude_none=True, by_alias=True)}
        elif isinstance(fmt, TextFormatJsonObject):
            body["response_format"] = {"type": "json_object"}
        extra = request.model_extra or {}
        body.update({k: extra[k] for k in PASS_THROUGH_FIELDS if k in extra})
        try:
            chat_request = ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
        except ValidationError as exc:
            raise _remap(from_validation_error(exc)) from None
        return chat_request, conversation

    def _keep(self, request: ResponsesRequest, response: SDKResponse, conversation: list[dict]) -> None:
        if request.store:
            outputs = [_dump(item) for item in response.output]
            self.store.put(StoredResponse(response, items_to_messages(outputs, conversation),
                                          listed_input_items(request.input)))

    def _response(self, request: ResponsesRequest, response_id: str, created: int, status: str,
                  output: list[Any], usage: UsageInfo | None) -> SDKResponse:
        choice = request.tool_choice
        if isinstance(choice, ToolChoiceFunctionIn):
            choice = ToolChoiceFunction(type="function", name=choice.name)
        fmt = request.text.format if request.text else None
        if isinstance(fmt, TextFormatJsonSchema):
            text_format = ResponseFormatTextJSONSchemaConfig.model_validate(
                fmt.model_dump(by_alias=True, exclude_none=True))
        elif isinstance(fmt, TextFormatJsonObject):
            text_format = ResponseFormatJSONObject(type="json_object")
        else:
            text_format = ResponseFormatText(type="text")
        done = status in ("completed", "incomplete")
        return ResponseObject(
            id=response_id, object="response", created_at=created, status=status,
            completed_at=int(time.time()) if done else None,
            model=self.chat.options.model_name, output=output, error=None,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            instructions=request.instructions, metadata=request.metadata or {},
            parallel_tool_calls=request.parallel_tool_calls, temperature=request.temperature, top_p=request.top_p,
            max_output_tokens=request.max_output_tokens, previous_response_id=request.previous_response_id,
            tool_choice=choice or "auto",
            tools=[FunctionTool(**t.model_dump(exclude_none=True)) for t in request.tools or []],
            text=ResponseTextConfig(format=text_format),
            reasoning=Reasoning(**request.reasoning.model_dump(exclude_none=True)) if request.reasoning else None,
            usage=_usage(usage), user=request.user, store=request.store, top_logprobs=request.top_logprobs,
        )

    async def _events(self, request: ResponsesRequest, response_id: str, created: int, conversation: list[dict],
                      chunks: AsyncIterator[ChatCompletionStreamResponse]) -> AsyncIterator[SDKModel]:
        out = _Output()
        response = self._response(request, response_id, created, "in_progress", [], None)
        yield out.event(ResponseCreatedEvent, type="response.created", response=response)
        yield out.event(ResponseInProgressEvent, type="response.in_progress", response=response)
        try:
            async with aclosing(self._items(out, chunks)) as pieces:
                async for event in pieces:
                    yield event
        except Exception as exc:  # after the stream started: an error event ends it
            err = _remap(from_exception(exc))
            yield out.event(ResponseErrorEvent, type="error", code=err.code or err.body().error.type,
                            message=err.message, param=err.param)
            return
        status = out.status
        response = self._response(request, response_id, created, status, out.items, out.usage)
        self._keep(request, response, conversation)
        if status == "incomplete":
            yield out.event(ResponseIncompleteEvent, type="response.incomplete", response=response)
        else:
            yield out.event(ResponseCompletedEvent, type="response.completed", response=response)

    async def _items(self, out: _Output, chunks: AsyncIterator[ChatCompletionStreamResponse]
                     ) -> AsyncIterator[SDKModel]:
        """The output items' events from the chat chunks; sets out.status and out.usage at the end."""
        finish_reason = None
        async with aclosing(chunks):
            async for chunk in chunks:
                out.usage = chunk.usage or out.usage
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                finish_reason = choice.finish_reason or finish_reason
                delta = choice.delta
                events = []
                if delta.reasoning_content:
                    events += out.feed("reasoning", delta.reasoning_content)
                if delta.content:
                    events += out.feed("message", delta.content, logprobs=self.logprobs(choice.logprobs))
                for piece in delta.tool_calls or []:
                    if piece.function.name is not None and piece.index != out.tool_index:  # a new call
                        events += out.feed("function_call", piece.function.arguments or "",
                                           (piece.id or _new_id("call"), piece.function.name))
                        out.tool_index = piece.index
                    elif piece.function.arguments:
                        events += out.delta(piece.function.arguments)
                for event in events:
                    yield event
        out.status = "incomplete" if finish_reason == "length" else "completed"
        events = []
        if not out.has("message") and not out.has("function_call"):
            events += out.feed("message", "")  # an empty answer is still a message, as when not streamed
        events += out.close(out.status)
        for event in events:
            yield event


def _sse(events: AsyncIterator[SDKModel]) -> StreamingResponse:
    """`event: <type>` + `data: <json>` frames, as OpenAI sends them (no [DONE] for Responses)."""

    async def frames() -> AsyncIterator[str]:
        async with aclosing(events):
            async for event in events:
                data = event.model_dump_json(by_alias=True, exclude_unset=True, serialize_as_any=True)
                yield f"event: {event.type}\ndata: {data}\n\n"

    return StreamingResponse(frames(), media_type="text/event-stream")
