"""Request and response bodies of the OpenAI API, with FastDeploy's extras (spec: "参数差异").

Unknown request fields are ignored, as FastDeploy does; every documented field is validated here,
so a bad value is a 400 naming the field, before anything reaches the engine.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    model_serializer,
    model_validator,
)

from slipstream.sampling_params import StructuredOutputsParams

TokenIds = list[Annotated[int, Field(ge=0)]]

# Stop strings and bad words are matched against every new token: a request may not make that unbounded.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
StopStr = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
StopList = Annotated[list[StopStr], Field(max_length=MAX_STOP_STRINGS)]


# Arguments of render_chat_text and transformers' apply_chat_template, set by the server: chat_template_kwargs
# (template variables) may not name them.
_RENDER_ARGUMENTS = frozenset({
    "tokenizer", "messages", "conversation", "chat_template", "add_generation_prompt", "continue_final_message",
    "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs"})


def _template_variables(kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    if kwargs and (taken := sorted(kwargs.keys() & _RENDER_ARGUMENTS)):
        raise ValueError(f"{', '.join(taken)} cannot be set here: template variables only")
    return kwargs


TemplateVariables = Annotated[dict[str, Any] | None, AfterValidator(_template_variables)]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`; vLLM's structural_tag form carries the tag in its other keys."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema")
        return self


class StructuredOutputsRequest(BaseModel):
    """vLLM's `structured_outputs` (its other keys, such as whitespace_pattern, are ignored)."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: dict[str, Any] | str | None = None


# The guided forms one request may use, and the field each one came in.
_GUIDED_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                  "guided_grammar", "guided_json_object", "structural_tag")


class SamplingRequest(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(allow_inf_nan=False)  # (JSON's Infinity / NaN: no sampling setting means them)
    model: str | None = None
    prompt_token_ids: TokenIds | None = None  # overrides messages / prompt
    max_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int = Field(default=1, ge=0)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    n: int = Field(default=1, ge=1, le=128)
    stop: StopStr | StopList | None = None
    stop_token_ids: TokenIds | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    bad_words: StopList | None = None
    bad_words_token_ids: TokenIds | None = None  # FastDeploy's: token ids never sampled
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    reasoning_max_tokens: int | None = Field(default=None, ge=1)
    response_max_tokens: int | None = Field(default=None, ge=1)  # FastDeploy's: the answer after thinking
    prompt_logprobs: int | None = Field(default=None, ge=0)  # vLLM's: logprobs of the prompt's tokens
    include_logprobs_decode_token: bool = True  # FastDeploy's: false leaves token texts out of logprobs
    max_streaming_response_tokens: int | None = Field(default=None, ge=1)  # FastDeploy's: tokens per chunk
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False
    # Structured outputs: OpenAI's, vLLM's and FastDeploy's forms; at most one per request.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_json_object: bool | None = None
    structural_tag: dict[str, Any] | str | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @model_validator(mode="after")
    def _one_guided_form(self):
        given = [f for f in _GUIDED_FIELDS if getattr(self, f) not in (None, False)]
        if self.response_format is not None and self.response_format.type == "text":
            given.remove("response_format")
        if len(given) > 1:
            raise ValueError(f"give at most one structured-output form, got {', '.join(given)}")
        return self

    def structured_output_spec(self) -> StructuredOutputsParams | None:
        """The constraint the request asks for, whichever form it used."""
        rf = self.response_format
        if rf is not None and rf.type == "json_schema":
            return StructuredOutputsParams(json=rf.json_schema.schema_ or {}, param="response_format")
        if rf is not None and rf.type == "json_object":
            return StructuredOutputsParams(json_object=True, param="response_format")
        if rf is not None and rf.type == "structural_tag":
            return StructuredOutputsParams(structural_tag=rf.model_dump(exclude={"json_schema"}),
                                           param="response_format")
        if (so := self.structured_outputs) is not None:
            return StructuredOutputsParams(json=so.json_, regex=so.regex, choice=so.choice, grammar=so.grammar,
                                           json_object=bool(so.json_object), structural_tag=so.structural_tag)
        forms = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar", "guided_json_object": "json_object", "structural_tag": "structural_tag"}
        for name, kind in forms.items():
            if getattr(self, name) not in (None, False):
                return StructuredOutputsParams(**{kind: getattr(self, name)}, param=name)
        return None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class CalledFunctionIn(BaseModel):
    """The function of an earlier call in a conversation: its arguments as JSON text (OpenAI's) or as the object."""

    model_config = ConfigDict(extra="allow")

    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunctionIn


class ChatMessageIn(BaseModel):
    """An input message; extra keys (name, tool_call_id, ...) pass through to the chat template."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # only an assistant message (with tool_calls) may omit it
    tool_calls: list[ToolCallIn] | None = None  # an assistant's earlier calls, rendered by the template

    @model_validator(mode="after")
    def _content_given(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"a {self.role} message cannot carry tool_calls: only an assistant's can")
        return self

    def template_dict(self) -> dict[str, Any]:
        d = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            d["content"] = "".join(part.text for part in self.content)
        d.setdefault("content", "")
        return d


class FunctionDefinition(BaseModel):
    name: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: any object
    strict: bool | None = None


class ChatTool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessageIn], Field(min_length=1)] | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # default: auto with tools
    parallel_tool_calls: bool = True
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)  # at most --max-logprobs
    enable_thinking: bool | None = None
    chat_template_kwargs: TemplateVariables = None
    chat_template: str | None = None
    disable_chat_template: bool = False  # FastDeploy's: the one message's content is the prompt, as it is

    @model_validator(mode="after")
    def _check(self):
        if self.messages is None and self.prompt_token_ids is None:
            raise ValueError("messages is required")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        if self.disable_chat_template and self.prompt_token_ids is None and (
                len(self.messages) != 1 or self.tools or not isinstance(self.messages[0].content, str)):
            raise ValueError("disable_chat_template takes one message with text content and no tools")
        return self


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | TokenIds | list[TokenIds] | None = None
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0)  # at most --max-logprobs
    echo: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.prompt in (None, []) and self.prompt_token_ids is None:
            raise ValueError("prompt is required")
        return self


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class PromptLogprob(BaseModel):
    """vLLM's prompt_logprobs entry, keyed by token id."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[int, PromptLogprob] | None]  # None for the first prompt token


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class _WithoutNulls(BaseModel):
    """Serialized without its None fields. A streamed call's later pieces carried `"type": null`, which the openai
    SDK's stream helper merges over the first piece's "function" (and then asserts on): OpenAI leaves them out."""

    @model_serializer(mode="wrap")
    def _without_nulls(self, serialize: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in serialize(self).items() if v is not None}


class DeltaFunctionCall(_WithoutNulls):
    name: str | None = None
    arguments: str = ""


class DeltaToolCall(_WithoutNulls):
    """A piece of a streamed call: the first carries id, type and name; later ones argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class ChatMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    arrival_time: float | None = None  # seconds since the request arrived, at this chunk's last token


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    prompt_logprobs: PromptLogprobs | None = None  # on the first chunk


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    arrival_time: float | None = None  # streaming only
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "slipstream"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: TemplateVariables = None

    @model_validator(mode="after")
    def _check(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: TokenIds


class DetokenizeResponse(BaseModel):
    prompt: str
