"""How a chat request's tools reach the model and come back as calls: the one place that decides.

Two ways to show tools to the model:
- the chat template renders them (`apply_chat_template(tools=...)`), in the model's own format;
- the template knows nothing of tools (the embedded model's ChatML is one): they are described in a
  system message and the model writes calls in llama.cpp's "generic" JSON format, under a grammar.

Three ways to read calls back, by tool_choice:
- "required" or a named function: a grammar forces the calls, as vLLM does (a JSON list of calls, or
  the named function's arguments; in the generic format, its `tool_calls` object), so any model
  returns well-formed calls whose arguments validate against the function's schema;
- "auto": the `--tool-call-parser` reads the model's own markup (hermes, llama3_json, ...), or, in
  the generic format, a grammar lets the model answer text or calls; without a parser the answer is
  plain text;
- "none": tools are shown but the output is plain text (vLLM's default).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from slipstream import tools
from slipstream.entrypoints.openai.errors import APIError
from slipstream.entrypoints.openai.protocol import ChatCompletionRequest, ChatMessageIn, NamedToolChoice
from slipstream.sampling_params import StructuredOutputsParams
from slipstream.tools import ToolParser

_PROBE = "slipstream_probe_function"


def template_renders_tools(tokenizer, chat_template: str | None = None) -> bool:
    """Whether the chat template shows a `tools` list to the model (a probe function's name appears)."""
    tool = {"type": "function", "function": {"name": _PROBE, "description": "probe", "parameters": {}}}
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[tool], tokenize=False,
                                             add_generation_prompt=True, chat_template=chat_template)
    except Exception:  # a template that cannot take tools at all
        return False
    return _PROBE in text


@dataclass
class ToolPlan:
    """What one request's tools change: the messages and template arguments, the grammar, the parser."""

    messages: list[dict[str, Any]]
    template_tools: list[dict[str, Any]] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    parser: ToolParser | None = None


def describe_tool_format(renders_tools: bool, parser_name: str | None) -> str:
    """A line for the start-up log: which tool format the model got."""
    if not renders_tools:
        return ("tool calls: the chat template knows no tools; they are described in a system message and calls "
                "are written in llama.cpp's generic JSON format under a grammar")
    if parser_name is None:
        return ("tool calls: the chat template renders tools; tool_choice=auto answers are plain text (no "
                "--tool-call-parser); required and named choices are enforced with a grammar")
    return f"tool calls: the chat template renders tools; tool_choice=auto is parsed with {parser_name}"


def _template_message(message: ChatMessageIn, generic: bool) -> dict[str, Any]:
    """A message for the template. Earlier calls' arguments become objects (templates `tojson` them);
    in the generic format an assistant's calls become the JSON text it is asked to write."""
    d = message.template_dict()
    calls = d.get("tool_calls")
    if not calls:
        return d
    if generic:
        text = tools.render_generic_calls(calls)
        d.pop("tool_calls")
        d["content"] = f"{d['content']}\n{text}" if d.get("content") else text
        return d
    d["tool_calls"] = [_with_parsed_arguments(c) for c in calls]
    return d


def _with_parsed_arguments(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        arguments = json.loads(fn["arguments"])
    except json.JSONDecodeError:
        return call
    return {**call, "function": {**fn, "arguments": arguments}}


def check_tools(request: ChatCompletionRequest) -> None:
    """A tool_choice that the tools cannot satisfy is a 400 naming it."""
    choice = request.tool_choice
    if choice is not None and choice != "none" and not request.tools:
        raise APIError("tool_choice needs tools", param="tool_choice")
    names = [t.function.name for t in request.tools or []]
    if len(set(names)) < len(names):
        raise APIError("tools: two functions share a name", param="tools")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise APIError(f"tool_choice names the function {choice.function.name!r}, which is not among the tools",
                       param="tool_choice")


def _answer_schema(request: ChatCompletionRequest) -> dict[str, Any] | None:
    """The JSON schema a text answer must match beside tool calls in the generic format (which the tools' grammar
    carries): the request's structured output, where it is a JSON form; None for free text."""
    try:
        spec = request.structured_output_spec()
    except ValueError as exc:
        raise APIError(str(exc), param="structured_outputs") from exc
    if spec is None:
        return None
    if spec.json is not None:
        try:
            return json.loads(spec.json) if isinstance(spec.json, str) else spec.json
        except json.JSONDecodeError as exc:
            raise APIError(f"{spec.param}: the JSON schema is not JSON: {exc}", param=spec.param) from exc
    if spec.json_object:
        return {"type": "object"}
    if spec.choice is not None:
        return {"enum": list(spec.choice)}
    raise APIError(f"{spec.param}: beside tools, an answer can follow a JSON schema, a JSON object or a choice, not a "
                   f"{spec.kind} (this model's chat template knows no tools: calls and answers share one grammar)",
                   param=spec.param)


def plan_tools(request: ChatCompletionRequest, renders_tools: bool, parser_name: str | None) -> ToolPlan:
    check_tools(request)
    generic = bool(request.tools) and not renders_tools
    messages = [_template_message(m, generic) for m in request.messages or []]
    if not request.tools:
        return ToolPlan(messages)
    functions = [t.function.model_dump(exclude_none=True) for t in request.tools]
    choice = request.tool_choice or "auto"
    named = isinstance(choice, NamedToolChoice)
    parallel = request.parallel_tool_calls and not named  # (a named choice: one call to it)
    if named:
        functions = [f for f in functions if f["name"] == choice.function.name]
    if choice == "none":
        return ToolPlan(messages, None if generic else [t.model_dump(exclude_none=True) for t in request.tools])
    if generic:
        allow_response = choice == "auto"
        answer = _answer_schema(request) if allow_response else None
        system = tools.generic_system_prompt(functions, parallel, allow_response, answer)
        if messages and messages[0]["role"] in ("system", "developer"):
            messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{system}"}
        else:
            messages.insert(0, {"role": "system", "content": system})
        schema = tools.generic_schema(functions, parallel, allow_response, answer)
        return ToolPlan(messages, None, StructuredOutputsParams(json=schema, param="tools"), tools.GenericFormat())
    template_tools = [t.model_dump(exclude_none=True) for t in request.tools]
    if named:
        schema = tools.parameters_schema(functions[0])
        return ToolPlan(messages, template_tools, StructuredOutputsParams(json=schema, param="tools"),
                        tools.NamedCallFormat(functions[0]["name"]))
    if choice == "required":
        schema = tools.call_list_schema(functions, parallel)
        return ToolPlan(messages, template_tools, StructuredOutputsParams(json=schema, param="tools"),
                        tools.CallListFormat())
    return ToolPlan(messages, template_tools, None, tools.get_tool_parser(parser_name) if parser_name else None)
