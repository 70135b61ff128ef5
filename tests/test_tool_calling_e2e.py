"""tool_choice="auto" end to end, once per tool-call parser: the real server process with `--tool-call-parser NAME
--enable-auto-tool-choice` over a scripted model (tests/scripted_model.py: real engine, sampler, detokenizer,
parsers and SSE; only the weights are chosen) whose chat template renders `tools`, so the server shows the
tools to the template and reads the calls out of the model's own markup. Each parser gets its own model (the
scripted model continues from the last two tokens, so one model follows one script), and each script writes
that parser's markup with some text or none and one or two calls, so every field of the answer has one right
value, written out here. The scripts are given token by token: tags split over several tokens (`<tool` +
`_call>`, `<|python` + `_tag|>`) and tags merged with text or JSON in one token (`now.<tool_call>{"name":`)
check that the parsers hold back and cut tags wherever the token boundaries fall. One server also runs
`--reasoning-parser qwen3` with a script that thinks before its call, so reasoning_content and tool_calls
coexist. Driven with the official `openai` client, non-streamed and streamed.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import openai
import pytest
from scripted_model import BOS, CHAT_TEMPLATE, EOS, PIECE, THINK_TAGS, save_scripted_model_from_tokens
from scripted_server import running_scripted_server

# The scripted template with a system turn listing the tools first: the probe in tool_calling.py finds them.
TOOLS_HEADER = "{% if tools %}<|im_start|>system\n{{ tools | tojson }}<|im_end|>\n{% endif %}"
THINKING_TEMPLATE = TOOLS_HEADER + CHAT_TEMPLATE  # opens `<think>\n` itself unless enable_thinking is false
PLAIN_TEMPLATE = TOOLS_HEADER + CHAT_TEMPLATE.split("{% if enable_thinking")[0] + "{% endif %}"

QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The time in a time zone",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}, "format": {"type": "string"}},
                       "required": ["timezone"]}}},
    {"type": "function", "function": {
        "name": "search_flights", "description": "Flights on a route",
        "parameters": {"type": "object", "properties": {
            "route": {"type": "object", "properties": {"from": {"type": "string"}, "to": {"type": "string"}}},
            "dates": {"type": "array", "items": {"type": "string"}}, "note": {"type": "string"}}}}},
]
_TAG = re.compile("(" + "|".join(map(re.escape, (BOS, EOS, *THINK_TAGS))) + ")")


def toks(text: str) -> list[str]:
    """The tokens the scripted tokenizer encodes `text` into (tags whole, then words with their space)."""
    parts = _TAG.split(text)  # text, tag, text, ...
    return [t for i, part in enumerate(parts) for t in ([part] if i % 2 else re.findall(PIECE, part))]


@dataclass(frozen=True)
class Case:
    parser: str
    output: list[str]  # the model's tokens after the prompt, EOS last
    content: str | None  # with tool_choice auto
    calls: list[tuple[str, dict]]  # (name, arguments)
    reasoning: str | None = None  # with --reasoning-parser qwen3 (the template opens thinking)

    @property
    def text(self) -> str:
        return "".join(t for t in self.output if t != EOS)

    @property
    def answer(self) -> str:
        """The text after thinking: the content with tool_choice none."""
        return self.text.split("</think>", 1)[1].lstrip() if self.reasoning else self.text


WEATHER = {"city": "Paris", "unit": "celsius"}
FLIGHTS = {"route": {"from": "Paris", "to": "Tokyo"}, "dates": ["2025-06-01", "2025-06-15"],
           "note": "window seat, {not} aisle"}
THOUGHT = "The user wants the weather in Beijing, so I call get_weather."

CASES = {
    # Text, then two calls: the first start tag and the last end tag split over two tokens each; nested
    # object, array, and a string with a comma and braces.
    "hermes": Case(
        "hermes",
        toks("Let me check the weather and the flights.\n") + ["<tool", "_call>"]
        + toks(f'{{"name": "get_weather", "arguments": {json.dumps(WEATHER)}}}\n</tool_call>\n<tool_call>\n'
               f'{{"name": "search_flights", "arguments": {json.dumps(FLIGHTS)}}}\n') + ["</tool", "_call>", EOS],
        "Let me check the weather and the flights.",
        [("get_weather", WEATHER), ("search_flights", FLIGHTS)],
    ),
    # No text: `<|python_tag|>` split over two tokens, then two calls separated by `;`, one inside a string too.
    "llama3_json": Case(
        "llama3_json",
        ["<|python", "_tag|>"]
        + toks('{"name": "get_time", "parameters": {"timezone": "Asia/Tokyo; JST"}}; '
               '{"name": "get_weather", "parameters": {"city": "Tokyo", "unit": "fahrenheit"}}') + [EOS],
        None,
        [("get_time", {"timezone": "Asia/Tokyo; JST"}), ("get_weather", {"city": "Tokyo", "unit": "fahrenheit"})],
    ),
    # Thinking (opened by the template), then one call and no text.
    "ernie-x1": Case(
        "ernie-x1",
        toks(f"{THOUGHT}\n</think>\n\n<tool_call>\n"
             '{"name": "get_weather", "arguments": {"city": "北京", "unit": "celsius"}}\n</tool_call>\n') + [EOS],
        None,
        [("get_weather", {"city": "北京", "unit": "celsius"})],
        reasoning=THOUGHT,
    ),
    # Text, then one call whose tags share a token with the text before and the JSON around them.
    "ernie-45": Case(
        "ernie-45",
        toks('Checking the time now.<tool_call>{"name": "get_time", "arguments": '
             '{"timezone": "Europe/Paris", "format": "{hh}:{mm}, 24h"}}</tool_call>') + [EOS],
        "Checking the time now.",
        [("get_time", {"timezone": "Europe/Paris", "format": "{hh}:{mm}, 24h"})],
    ),
}
TWO_CALLS = [name for name, case in CASES.items() if len(case.calls) == 2]
# Tag text, whole or in the pieces the scripts split it into; and call JSON. None of it may reach content.
LEAKS = ("<tool", "_call>", "<|python", "_tag|>", *THINK_TAGS, '"name"')


@dataclass
class Server:
    case: Case
    client: openai.OpenAI
    log: Callable[[], str]


@pytest.fixture(scope="module", params=list(CASES))
def server(request, tmp_path_factory):
    case = CASES[request.param]
    prompt_end = ["assistant", "\n", "<think>", "\n"] if case.reasoning else ["assistant", "\n"]
    model_dir = save_scripted_model_from_tokens(tmp_path_factory.mktemp(case.parser), [prompt_end + case.output],
                                                texts=["user\n", QUESTION[0]["content"]])
    template = model_dir / "template.jinja"
    template.write_text(THINKING_TEMPLATE if case.reasoning else PLAIN_TEMPLATE)
    args = ["--model", str(model_dir), "--chat-template", str(template), "--kv-cache-memory", "16MiB",
            "--tool-call-parser", case.parser, "--enable-auto-tool-choice"]
    if case.reasoning:
        args += ["--reasoning-parser", "qwen3"]
    with running_scripted_server(*args) as running:
        client = openai.OpenAI(base_url=running.base_url, api_key="unused", max_retries=0, timeout=120)
        yield Server(case, client, running.log)


def chat(server: Server, **kwargs):
    kwargs.setdefault("tool_choice", "auto")
    return server.client.chat.completions.create(model="scripted", messages=QUESTION, tools=TOOLS, temperature=0,
                                                 **kwargs)


def stream_chat(server: Server, check_leaks: bool = True, **kwargs):
    """(reasoning, content, [(id, name, arguments)], finish_reason) of a streamed chat, checking the deltas'
    shape: a call's first delta has its index (the next one), id, type and name; later ones only arguments;
    the finish reason comes on the last chunk only."""
    chunks = [c for c in chat(server, stream=True, **kwargs) if c.choices]
    reasoning, content, calls = "", "", {}
    for chunk in chunks:
        delta = chunk.choices[0].delta
        r, c = getattr(delta, "reasoning_content", None) or "", delta.content or ""
        if check_leaks:
            assert not any(leak in c for leak in LEAKS), f"tag or call text in a content delta: {c!r}"
        reasoning, content = reasoning + r, content + c
        for tc in delta.tool_calls or []:
            if tc.index not in calls:
                assert tc.index == len(calls)
                assert tc.id and tc.id.startswith("call_") and tc.type == "function" and tc.function.name
                calls[tc.index] = [tc.id, tc.function.name, tc.function.arguments or ""]
            else:
                assert tc.id is None and tc.type is None and tc.function.name is None, "a call's header repeated"
                calls[tc.index][2] += tc.function.arguments or ""
    reasons = [c.choices[0].finish_reason for c in chunks]
    assert all(r is None for r in reasons[:-1])
    return reasoning or None, content or None, [tuple(c) for c in calls.values()], reasons[-1]


def test_non_stream_returns_the_scripted_calls(server):
    case = server.case
    r = chat(server)
    choice = r.choices[0]
    message = choice.message
    assert choice.finish_reason == "tool_calls"
    assert message.content == case.content
    assert not any(leak in (message.content or "") for leak in LEAKS)
    assert getattr(message, "reasoning_content", None) == case.reasoning
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == case.calls
    assert all(c.type == "function" and c.id.startswith("call_") for c in message.tool_calls)
    assert len({c.id for c in message.tool_calls}) == len(message.tool_calls)


def test_stream_agrees_with_non_stream(server):
    case = server.case
    whole = chat(server).choices[0].message
    reasoning, content, calls, finish_reason = stream_chat(server)
    assert finish_reason == "tool_calls"
    assert (reasoning, content) == (getattr(whole, "reasoning_content", None), whole.content)
    assert (reasoning, content) == (case.reasoning, case.content)
    assert [(name, args) for _, name, args in calls] == [(c.function.name, c.function.arguments)
                                                         for c in whole.tool_calls]
    assert [(name, json.loads(args)) for _, name, args in calls] == case.calls
    assert len({id_ for id_, _, _ in calls}) == len(calls)


def test_tool_choice_none_returns_the_markup_as_text(server):
    case = server.case
    r = chat(server, tool_choice="none")
    choice = r.choices[0]
    assert not choice.message.tool_calls
    assert choice.message.content == case.answer
    assert getattr(choice.message, "reasoning_content", None) == case.reasoning
    assert choice.finish_reason == "stop"
    reasoning, content, calls, finish_reason = stream_chat(server, check_leaks=False, tool_choice="none")
    assert (reasoning, content, calls, finish_reason) == (case.reasoning, case.answer, [], "stop")


@pytest.mark.parametrize("server", TWO_CALLS, indirect=True)
def test_parallel_tool_calls_false_returns_the_first_call_only(server):
    case = server.case
    r = chat(server, parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == case.content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == case.calls[:1]
    reasoning, content, calls, finish_reason = stream_chat(server, parallel_tool_calls=False)
    assert (content, finish_reason) == (case.content, "tool_calls")
    assert [(name, json.loads(args)) for _, name, args in calls] == case.calls[:1]


@pytest.mark.parametrize("server", [name for name, case in CASES.items() if case.reasoning], indirect=True)
def test_calls_without_thinking(server):
    """enable_thinking false: the template closes thinking empty, the model goes straight to its calls."""
    case = server.case
    r = chat(server, extra_body={"enable_thinking": False})
    choice = r.choices[0]
    assert (getattr(choice.message, "reasoning_content", None), choice.message.content) == (None, case.content)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == case.calls
    assert choice.finish_reason == "tool_calls"
    reasoning, content, calls, finish_reason = stream_chat(server, extra_body={"enable_thinking": False})
    assert (reasoning, content, finish_reason) == (None, case.content, "tool_calls")
    assert [(name, json.loads(args)) for _, name, args in calls] == case.calls


def test_log_names_the_tool_format(server):
    deadline = time.monotonic() + 10  # the line follows readiness; /health may answer just before it
    while "tool calls:" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [line for line in server.log().splitlines() if "tool calls:" in line]
    assert lines, 'the server logs no "tool calls:" line'
    assert "renders tools" in lines[0] and server.case.parser in lines[0], lines[0]
