"""The JSON formats the server makes a model write tool calls in when it constrains the output with a grammar.

`tool_choice="required"` and a named `tool_choice` use vLLM's formats: a list of calls, or just the named
function's arguments. A chat template that knows nothing of tools gets llama.cpp's "generic" format: the
system prompt lists the functions and the model answers with one JSON object, either calls or a response.
Each format is read by a parser like the model-specific ones (not registered: the server picks them), and
comes with the JSON schema that the grammar engine turns into the grammar.
"""

from __future__ import annotations

import json
from typing import Any

from slipstream.tools.base import ToolCall, ToolParser, read_call_list
from slipstream.tools.json_scan import JSONScanError, decode_string, scan_object, skip_space, value_end


def _call_list(text: str, pos: int, final: bool) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a JSON list of calls whose `[` is at `pos`: no content, unless the text turns out
    not to be such a list before a call is known, when it is all content."""
    calls, stop = read_call_list(text, pos + 1, ",", final)
    if not calls and stop is not None and not text.startswith("]", stop):
        return text, []
    return "", calls


class CallListFormat(ToolParser):
    """The whole output is a list of calls, `[{"name": …, "parameters": {…}}, …]` (`tool_choice="required"`)."""

    def _split(self, text: str, final: bool) -> tuple[str, list[ToolCall]]:
        start = skip_space(text, 0)
        if start == len(text) or text[start] != "[":
            return ("" if start == len(text) and not final else text), []
        return _call_list(text, start, final)


class NamedCallFormat(ToolParser):
    """The whole output is the arguments object of the function `tool_choice` names: one call to it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _split(self, text: str, final: bool) -> tuple[str, list[ToolCall]]:
        # Stripping both ends of a growing text only ever extends it: whitespace at its end is merely held.
        arguments = text.strip()
        try:
            complete = value_end(arguments, 0) == len(arguments)
        except JSONScanError:
            complete = False
        return "", [ToolCall(self.name, arguments, complete)]


class GenericFormat(ToolParser):
    """llama.cpp's generic format: `{"tool_calls": [{"name": …, "arguments": {…}}, …]}`, or `{"response": "…"}`
    whose string is the content, streamed as it grows."""

    def _split(self, text: str, final: bool) -> tuple[str, list[ToolCall]]:
        start = skip_space(text, 0)
        if start == len(text) or text[start] != "{":
            return ("" if start == len(text) and not final else text), []
        scan = scan_object(text, start)
        if not scan.members:  # the first key is still being written, or there is none
            waiting = not final and scan.end is None and scan.error is None
            return ("" if waiting else text), []
        key, value, end = scan.members[0]
        if value == len(text):
            return ("" if not final else text), []
        if key == "response" and text[value] == '"':
            body = text[value + 1 : len(text) if end is None else end - 1]
            return decode_string(body, complete=end is not None), []
        if key == "response":  # an answer in the request's JSON schema (response_format): its JSON text
            return text[value : len(text) if end is None else end], []
        if key == "tool_calls" and text[value] == "[":
            return _call_list(text, value, final)
        return text, []


def parameters_schema(function: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of a function's arguments; none given is an empty parameter list, as OpenAI reads it."""
    return function.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}


# Keys whose values are data, not schemas: a "$ref" in them is not a reference.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})


def _rebased(node: Any, base: str) -> Any:
    """`node` (a schema or part of one) with every local reference ("#", "#/$defs/A", "#/properties/x", ...) made to
    point below `base` ("#/$defs/<name>") instead of the root."""
    if isinstance(node, list):
        return [_rebased(item, base) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = base + value[1:]
        elif key in _DATA_KEYWORDS:
            out[key] = value
        else:
            out[key] = _rebased(value, base)
    return out


def _embedded(schema: dict[str, Any], name: str, defs: dict[str, Any]) -> dict[str, Any]:
    """`schema` to be placed below another schema's root. Its local references ("#/$defs/Address", "#" for a tree's
    children: what pydantic writes for nested models) would resolve against that root: such a schema moves whole
    into `defs[name]` (which the caller puts at the root's "$defs"), its references rebased there, and is referred
    to. Schemas without them stay as they are."""
    rebased = _rebased(schema, f"#/$defs/{name}")
    if rebased == schema:  # (no local reference in it)
        return schema
    defs[name] = rebased
    return {"$ref": f"#/$defs/{name}"}


def _with_defs(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "$defs": defs} if defs else schema


def _calls_array(functions: list[dict[str, Any]], parallel: bool, arguments_key: str,
                 defs: dict[str, Any]) -> dict[str, Any]:
    """Schema of a list of calls, each `{"name": <one of the functions>, <arguments_key>: <its parameters>}` (the
    parameters' own definitions go to `defs`, for the root)."""
    items = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]},
                           arguments_key: _embedded(parameters_schema(f), f"arguments_{i}", defs)},
            "required": ["name", arguments_key],
            "additionalProperties": False,
        }
        for i, f in enumerate(functions)
    ]
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": items}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def call_list_schema(functions: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """JSON schema of `CallListFormat` for these OpenAI function dicts (`{"name", "description"?, "parameters"?}`)."""
    defs: dict[str, Any] = {}
    return _with_defs(_calls_array(functions, parallel, "parameters", defs), defs)


def generic_schema(functions: list[dict[str, Any]], parallel: bool, allow_response: bool,
                   answer: dict[str, Any] | None = None) -> dict[str, Any]:
    """JSON schema of `GenericFormat`: calls to these functions or, when `allow_response`, a response: a string, or
    a value of the `answer` schema (the request's response_format)."""
    defs: dict[str, Any] = {}
    alternatives = [
        {
            "type": "object",
            "properties": {"tool_calls": _calls_array(functions, parallel, "arguments", defs)},
            "required": ["tool_calls"],
            "additionalProperties": False,
        }
    ]
    if allow_response:
        alternatives.append(
            {
                "type": "object",
                "properties": {"response": _embedded(answer, "answer", defs) if answer else {"type": "string"}},
                "required": ["response"],
                "additionalProperties": False,
            }
        )
    return _with_defs({"anyOf": alternatives}, defs)


def generic_system_prompt(functions: list[dict[str, Any]], parallel: bool, allow_response: bool,
                          answer: dict[str, Any] | None = None) -> str:
    """The instruction that tells a model without native tool calling about the functions and `GenericFormat`."""
    reply = ('{"response": <your answer: JSON of the schema ' + json.dumps(answer, ensure_ascii=False) + ">}"
             if answer else '{"response": "<your answer>"}')
    lines = ["You can call these functions, each given with its name, what it does and the JSON schema of its "
             "arguments:", ""]
    for f in functions:
        lines.append(f"- {f['name']}" + (f": {f['description']}" if f.get("description") else ""))
        lines.append(f"  Arguments: {json.dumps(parameters_schema(f), ensure_ascii=False)}")
    how_many = "listing one or more calls" if parallel else "with exactly one call in the list"
    lines += [
        "",
        "Reply with exactly one JSON object and nothing else.",
        f'To call functions, reply {{"tool_calls": [{{"name": "<function name>", "arguments": {{<its arguments>}}}}]}}'
        f", {how_many}.",
        f"To answer the user directly instead, reply {reply}; once the results of your "
        "calls (the tool messages) hold what the user asked for, answer with them that way." if allow_response
        else "Always call a function: do not answer with text.",
    ]
    return "\n".join(lines)


def render_generic_calls(tool_calls: list[dict[str, Any]]) -> str:
    """An assistant message's OpenAI `tool_calls` as `GenericFormat` text, so that a conversation shows the model
    its earlier calls in the format it is asked to write."""
    calls = []
    for tc in tool_calls:
        arguments = tc["function"].get("arguments") or "{}"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                pass  # not JSON: shown as the string it is
        calls.append({"name": tc["function"]["name"], "arguments": arguments})
    return json.dumps({"tool_calls": calls}, ensure_ascii=False)
