"""Tool-call parsers and formats: whole outputs give the expected content and calls, streamed deltas add up
to the whole-output result however the output is cut, no tag text reaches content, malformed outputs never
raise, and the formats' schemas are ones the grammar engine takes and that hold their sample outputs."""

from __future__ import annotations

import itertools
import json

import pytest
import xgrammar as xgr
from hypothesis import given, settings
from hypothesis import strategies as st
from xgrammar.testing import _is_grammar_accept_string

from slipstream.tools import (
    TOOL_PARSERS,
    CallListFormat,
    GenericFormat,
    NamedCallFormat,
    ToolParser,
    call_list_schema,
    generic_schema,
    generic_system_prompt,
    get_tool_parser,
    render_generic_calls,
)
from slipstream.tools.json_scan import JSONScanError, decode_string, value_end

TAGS = ("<tool_call>", "</tool_call>", "<|python_tag|>")


def make(name: str) -> ToolParser:
    if name == "call_list":
        return CallListFormat()
    if name == "named":
        return NamedCallFormat("get_weather")
    if name == "generic":
        return GenericFormat()
    return get_tool_parser(name)


PARSER_NAMES = ["hermes", "ernie-x1", "ernie-45", "llama3_json", "call_list", "named", "generic"]


def call(name: str, text: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {text}}}\n</tool_call>'


WEATHER = '{"city": "Paris", "unit": "c"}'
TRICKY = ('{"q": "a } b { c ] [", "quote": "she said \\"hi\\"", "tag": "</tool_call> <tool_call>", '
          '"nested": {"list": [1, -2.5e3, true, false, null, {"deep": []}], "empty": {}}, '
          '"unicode": "北京 😀 \\u00e9 \\ud83d\\ude00", "slash": "C:\\\\dir\\\\"}')

# (parser, output, expected content, expected calls as (name, arguments as parsed JSON))
CASES = [
    ("hermes", "The weather in Paris is sunny, 2 < 3 and <tool is no tag.",
     "The weather in Paris is sunny, 2 < 3 and <tool is no tag.", []),
    ("hermes", "", None, []),
    ("hermes", call("get_weather", WEATHER), None, [("get_weather", json.loads(WEATHER))]),
    ("hermes", f"Let me check both.\n\n{call('get_weather', WEATHER)}\nAnd the time:\n{call('get_time', '{}')}\n"
               "Done.", "Let me check both.\n\nAnd the time:\n\nDone.",
     [("get_weather", json.loads(WEATHER)), ("get_time", {})]),
    ("hermes", call("search", TRICKY), None, [("search", json.loads(TRICKY))]),
    ("hermes", '<tool_call>\n{"parameters": {"x": [1, {"y": "}"}]}, "name": "late_name"}\n</tool_call>', None,
     [("late_name", {"x": [1, {"y": "}"}]})]),
    ("hermes", '<tool_call>{"name":"get_time"}</tool_call>', None, [("get_time", {})]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n</tool_call>', None,
     [("get_weather", {"city": "Paris"})]),
    # The model left out an end tag: the next call still counts.
    ("hermes", '<tool_call>{"name": "a", "arguments": {}}\n<tool_call>{"name": "b", "arguments": {"k": 1}}'
               "</tool_call>", None, [("a", {}), ("b", {"k": 1})]),
    ("hermes", f"  Indented text {call('f', '{}')}  ", "  Indented text", [("f", {})]),
    ("ernie-x1", '<tool_call>\n{"name": "get_weather", "arguments": {"location": "北京", "unit": "c"}}\n'
                 "</tool_call>\n", None, [("get_weather", {"location": "北京", "unit": "c"})]),
    ("ernie-x1", "北京今天晴。", "北京今天晴。", []),
    ("ernie-45", f"好的。\n\n{call('get_weather', WEATHER)}", "好的。", [("get_weather", json.loads(WEATHER))]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None,
     [("get_weather", {"city": "Paris"})]),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": ' + TRICKY + "}",
     None, [("a", {}), ("b", json.loads(TRICKY))]),
    ("llama3_json", '\n\n  {"parameters": {"n": 1}, "name": "late"} ;\n{"name": "x", "arguments": {}}', None,
     [("late", {"n": 1}), ("x", {})]),
    ("llama3_json", "Hello! How can I help you today?", "Hello! How can I help you today?", []),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    ("llama3_json", '{"name": "f", "parameters": {"a": 1}}\nThat is the call.', "That is the call.",
     [("f", {"a": 1})]),
    ("call_list", '[{"name": "get_weather", "parameters": ' + WEATHER + '}, {"name": "search", "parameters": '
     + TRICKY + "}]", None, [("get_weather", json.loads(WEATHER)), ("search", json.loads(TRICKY))]),
    ("call_list", '[\n  {"name": "get_time", "parameters": {}}\n]', None, [("get_time", {})]),
    ("named", WEATHER, None, [("get_weather", json.loads(WEATHER))]),
    ("named", " \n" + TRICKY + "\n ", None, [("get_weather", json.loads(TRICKY))]),
    ("generic", '{"tool_calls": [{"name": "get_weather", "arguments": ' + WEATHER + '}, {"name": "search", '
     '"arguments": ' + TRICKY + "}]}", None, [("get_weather", json.loads(WEATHER)), ("search", json.loads(TRICKY))]),
    ("generic", '{"response": "Line 1\\nLine \\"2\\" \\u00e9 \\ud83d\\ude00 北京 \\\\ done"}',
     'Line 1\nLine "2" é 😀 北京 \\ done', []),
    ("generic", '{ "response" : "" }', None, []),
]

# Outputs no parser is meant to like: they must neither raise nor differ between stream and whole.
MALFORMED = [
    "<tool_call>oops</tool_call> then text",
    '<tool_call>{"foo": 1}</tool_call>',
    '<tool_call>{"name": 5, "arguments": {}}</tool_call>',
    '<tool_call>{"name": "", "arguments": {}}</tool_call>',
    '<tool_call>{"name": "f", "arguments": {"a": 1</tool_call> after',
    '<tool_call>{"name": "f", "arguments": {"a": tru</tool_call>',
    '<tool_call>{"name": "f", "arguments": {"a": "unterminated</tool_call>',
    '<tool_call>{"name": "f", "arguments": {}} stray </tool_call>x',
    '<tool_call>{"name": "f", "arguments": {}, "id": 1} </tool_call>',
    '<tool_call>{"name": "f", "arguments": {}, oops} </tool_call> tail',
    "<tool_call>",
    "text <tool_ca",
    '<tool_call>{"name": "f"',
    '<|python_tag|>brave_search.call(query="x")',
    "<|python_tag|>",
    '{"name": "f", "parameters": {}}; hello',
    '{"name": "f", "parameters": {}};',
    '{"name": "f", "parameters": {]}',
    '[{"name": "f", "parameters": {]',
    '[{"foo": 1}]',
    "[]",
    '{"response": 5}',
    '{"tool_calls": "x"}',
    '{"response": "abc\\',
    '{"response": "\\ud83d',
    '{"response": "\\ud83dx\\udc00\\u12G4\\q"}',
    '{"tool_calls": [{"name": "f", "arguments": {}}], "extra": 1}',
    "]}",
    "[" * 3000 + "]" * 2999,
    '{"name": "f", "arguments": ' + "[" * 3000,
]


def run_stream(parser: ToolParser, deltas: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """Feed `deltas`; checks that each call is named on its first delta only, in order; returns the content
    and the calls reassembled from the deltas."""
    stream = parser.stream()
    content, names, arguments = "", [], []
    for text, deltas_out in [*map(stream.feed, deltas), stream.finish()]:
        content += text
        for d in deltas_out:
            if d.index == len(names):
                assert d.name, "a call's first delta carries its name"
                names.append(d.name)
                arguments.append("")
            else:
                assert d.index < len(names) and d.name is None, "a name appears once per call"
            arguments[d.index] += d.arguments
    return content or None, list(zip(names, arguments, strict=True))


def whole(parser: ToolParser, text: str) -> tuple[str | None, list[tuple[str, str]]]:
    content, calls = parser.extract(text)
    return content, [(c.name, c.arguments) for c in calls]


def splits(text: str):
    """Every cut into two pieces, one character at a time, and token-like chunks of 3 and of 7 characters."""
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    yield list(text)
    for size in (3, 7):
        yield [text[i : i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES)
def test_extract(name, text, content, calls):
    got_content, got_calls = make(name).extract(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    assert all(c.complete for c in got_calls)
    for tag in TAGS:
        assert tag not in (got_content or "")


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES)
def test_stream_matches_extract_however_cut(name, text, content, calls):
    parser = make(name)
    expected = whole(parser, text)
    for deltas in splits(text):
        assert run_stream(parser, deltas) == expected, deltas


@pytest.mark.parametrize(("name", "text", "content", "calls"), [c for c in CASES if c[0] != "generic"])
def test_no_content_delta_carries_tag_text(name, text, content, calls):
    """Nothing of a tag goes out as content, not even a beginning of one that the text goes on to complete."""
    stream = make(name).stream()
    sent = ""
    for k in range(1, len(text) + 1):
        delta = stream.feed(text[k - 1])[0]
        sent += delta
        assert not any(tag in delta for tag in TAGS)
        for tag, n in ((t, n) for t in TAGS for n in range(1, len(t))):
            cut_tag = text[:k].endswith(tag[:n]) and text.startswith(tag[n:], k)
            assert not (cut_tag and sent.endswith(tag[:n])), (text[:k], sent)
    sent += stream.finish()[0]
    assert sent == (content or "")


@pytest.mark.parametrize("name", PARSER_NAMES)
def test_malformed_never_raises_and_streams_as_whole(name):
    parser = make(name)
    for text in MALFORMED + [case[1] for case in CASES]:
        expected = whole(parser, text)
        # Long ones (the deeply nested) in larger deltas: every delta re-reads the text so far.
        deltas = list(text) if len(text) < 500 else [text[i : i + 97] for i in range(0, len(text), 97)]
        assert run_stream(parser, deltas) == expected, text
        if len(text) < 200:
            for deltas in splits(text):
                assert run_stream(parser, deltas) == expected, deltas


def test_malformed_hermes_markup_stays_content():
    parser = get_tool_parser("hermes")
    assert parser.extract("<tool_call>oops</tool_call> then text") == ("<tool_call>oops</tool_call> then text", [])
    assert parser.extract('<tool_call>{"foo": 1}</tool_call>') == ('<tool_call>{"foo": 1}</tool_call>', [])
    content, calls = parser.extract('<tool_call>{"name": "f", "arguments": {"a": 1</tool_call> after')
    assert content == "after" and [(c.name, c.arguments, c.complete) for c in calls] == [("f", '{"a": 1', False)]
    # An unterminated string does not swallow the end tag into the arguments.
    _, calls = parser.extract('<tool_call>{"name": "f", "arguments": {"a": "x</tool_call>')
    assert calls[0].arguments == '{"a": "x' and not calls[0].complete


def test_malformed_llama3_output_is_content():
    parser = get_tool_parser("llama3_json")
    assert parser.extract(' <|python_tag|> is how I call tools') == (" <|python_tag|> is how I call tools", [])
    content, calls = parser.extract('{"name": "f", "parameters": {}}; hello')
    assert content == "hello" and [(c.name, c.arguments) for c in calls] == [("f", "{}")]
    content, calls = parser.extract('{"name": "f", "parameters": {]}')
    assert content == "]}" and [(c.name, c.arguments, c.complete) for c in calls] == [("f", "{", False)]


def test_truncated_call_is_incomplete():
    parser = get_tool_parser("hermes")
    content, calls = parser.extract('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
    assert content == "Sure."
    assert [(c.name, c.arguments, c.complete) for c in calls] == [("get_weather", '{"city": "Pa', False)]
    assert parser.extract('<tool_call>\n{"name": "get_wea') == ('<tool_call>\n{"name": "get_wea', [])


def test_stream_holds_a_possible_tag_and_flushes_it_at_the_end():
    stream = get_tool_parser("hermes").stream()
    assert stream.feed("Hi <tool") == ("Hi", [])
    assert stream.finish() == (" <tool", [])
    stream = get_tool_parser("llama3_json").stream()
    assert stream.feed(" <|py") == ("", [])
    assert stream.feed("thon") == ("", [])
    assert stream.feed("n") == (" <|pythonn", [])


def test_arguments_stream_before_the_call_ends():
    stream = get_tool_parser("hermes").stream()
    content, deltas = stream.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
    assert content == "" and [(d.index, d.name, d.arguments) for d in deltas] == [(0, "get_weather", '{"city": "Pa')]
    _, deltas = stream.feed('ris"}}\n</tool')
    assert [(d.index, d.name, d.arguments) for d in deltas] == [(0, None, 'ris"}')]
    assert stream.feed(">\n") == ("", [])
    assert stream.finish() == ("", [])


def test_named_call_streams_the_whole_output():
    stream = NamedCallFormat("f").stream()
    _, deltas = stream.feed(" ")
    assert [(d.name, d.arguments) for d in deltas] == [("f", "")]
    _, deltas = stream.feed('{"a": 1} \n')
    assert [(d.name, d.arguments) for d in deltas] == [(None, '{"a": 1}')]
    assert stream.finish() == ("", [])
    assert NamedCallFormat("f").extract('{"a": ')[1][0].complete is False


FRAGMENTS = ["<tool_call>", "</tool_call>", "<|python_tag|>", "{", "}", "[", "]", '"name"', '"arguments"',
             '"parameters"', '"tool_calls"', '"response"', ":", ",", ";", '"f"', '"x\\"', "\\", '"', " ", "\n", "1",
             "tru", "e", "a", "\\u", "d83d", "\\ude00", "<tool"]


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(PARSER_NAMES),
    parts=st.lists(st.sampled_from(FRAGMENTS), max_size=16),
    cuts=st.lists(st.integers(min_value=0, max_value=120), max_size=6),
)
def test_stream_matches_extract_on_any_text(name, parts, cuts):
    """Whatever the text, streaming never takes back what it handed out, and nothing raises."""
    text = "".join(parts)
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in itertools.pairwise(bounds)]
    parser = make(name)
    assert run_stream(parser, deltas) == whole(parser, text)


def test_value_end():
    assert value_end('{"a": [1, "]"]} tail', 0) == 15
    assert value_end('"x\\"y" z', 0) == 6
    assert value_end("true,", 0) == 4
    for prefix in ('{"a": [1, "]"', '{"a', "tr", "12", '{"a": 1,', "[", '"\\'):
        assert value_end(prefix, 0) is None, prefix
    for bad, pos in (('{"a" 1}', 5), ("[1 2]", 3), ("trux", 3), ('{"a": 1,}', 8), ("[1,]", 3), ("}", 0)):
        with pytest.raises(JSONScanError) as exc:
            value_end(bad, 0)
        assert exc.value.pos == pos, bad


def test_decode_string_only_appends():
    raw = 'a\\n\\"b\\" \\u00e9 \\ud83d\\ude00 \\ud83dx \\q'
    assert decode_string(raw) == json.loads('"' + raw.replace("\\q", "q").replace("\\ud83dx", "\\ufffdx") + '"')
    decoded = [decode_string(raw[:i], complete=False) for i in range(len(raw) + 1)]
    assert all(b.startswith(a) for a, b in itertools.pairwise(decoded))
    assert decoded[-1] == decode_string(raw)


def test_registry_names():
    assert set(TOOL_PARSERS) == {"hermes", "llama3-json", "ernie-x1", "ernie-45"}
    assert type(get_tool_parser("LLAMA3-JSON")) is type(get_tool_parser("llama3_json"))
    assert type(get_tool_parser("Ernie_X1")) is TOOL_PARSERS["ernie-x1"]
    with pytest.raises(ValueError, match="hermes"):
        get_tool_parser("no-such-parser")


FUNCTIONS = [
    {"name": "get_weather", "description": "The current weather in a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                    "required": ["city"]}},
    {"name": "get_time"},
]


def accepts(schema: dict, text: str) -> bool:
    return _is_grammar_accept_string(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False), text)


def test_call_list_schema():
    schema = call_list_schema(FUNCTIONS, parallel=True)
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    items = schema["items"]["anyOf"]
    assert [i["properties"]["name"] for i in items] == [{"const": "get_weather"}, {"const": "get_time"}]
    # no parameters given: an empty parameter list, as OpenAI reads it (once any object)
    assert items[1]["properties"]["parameters"] == {"type": "object", "properties": {}, "additionalProperties": False}
    assert not accepts(schema, '[{"name": "get_time", "parameters": {"tz": "UTC"}}]')
    assert all(i["required"] == ["name", "parameters"] and i["additionalProperties"] is False for i in items)
    two = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]'
    assert accepts(schema, two)
    assert not accepts(schema, "[]")
    assert not accepts(schema, '[{"name": "nope", "parameters": {}}]')
    single = call_list_schema(FUNCTIONS, parallel=False)
    assert single["maxItems"] == 1
    assert accepts(single, '[{"name": "get_time", "parameters": {}}]') and not accepts(single, two)
    _, calls = CallListFormat().extract(two)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]


def test_generic_schema():
    schema = generic_schema(FUNCTIONS, parallel=False, allow_response=True)
    calls_schema, response_schema = schema["anyOf"]
    assert calls_schema["required"] == ["tool_calls"] and calls_schema["additionalProperties"] is False
    assert calls_schema["properties"]["tool_calls"]["maxItems"] == 1
    assert response_schema == {"type": "object", "properties": {"response": {"type": "string"}},
                               "required": ["response"], "additionalProperties": False}
    one = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'
    assert accepts(schema, one)
    assert accepts(schema, '{"response": "Hello!"}')
    assert not accepts(schema, '{"tool_calls": [{"name": "get_time", "parameters": {}}]}')
    assert not accepts(generic_schema(FUNCTIONS, parallel=True, allow_response=False), '{"response": "Hello!"}')
    assert GenericFormat().extract('{"response": "Hello!"}') == ("Hello!", [])
    # an answer in the request's schema (response_format): its JSON text is the content, streamed as it grows
    joke = {"type": "object", "properties": {"setup": {"type": "string"}}, "required": ["setup"]}
    with_format = generic_schema(FUNCTIONS, parallel=True, allow_response=True, answer=joke)
    assert accepts(with_format, '{"response": {"setup": "a"}}') and not accepts(with_format, '{"response": "a"}')
    text = '{"response": {"setup": "a, b"} }'
    assert GenericFormat().extract(text) == ('{"setup": "a, b"}', [])
    stream = GenericFormat().stream()
    assert [stream.feed(text[i : i + 7])[0] for i in range(0, len(text), 7)] == [
        "", "{", '"setup"', ': "a, b', '"}']
    assert stream.finish() == ("", [])


def test_schemas_that_refer_to_themselves_keep_their_meaning_below_the_calls():
    """A function's parameters with "$defs" (pydantic's nested models) or "#" (a tree's children) resolved against
    the calls' schema once pasted into it: a 400, or "#" accepting a list of calls as a node's child."""
    node = {"name": "node", "parameters": {
        "$defs": {"Leaf": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"],
                           "additionalProperties": False}},
        "type": "object", "properties": {"leaf": {"$ref": "#/$defs/Leaf"}, "children": {"type": "array",
                                                                                          "items": {"$ref": "#"}}},
        "required": ["leaf", "children"], "additionalProperties": False, "default": {"$ref": "#/not/a/ref"}}}
    tree = '{"leaf": {"id": 1}, "children": [{"leaf": {"id": 2}, "children": []}]}'
    wrong = '{"leaf": {"id": 1}, "children": [[{"name": "node", "parameters": {"leaf": {"id": 2}, "children": []}}]]}'
    calls_of = '[{{"name": "node", "parameters": {}}}]'
    for schema, calls in ((call_list_schema([node, FUNCTIONS[1]], parallel=True), calls_of),
                          (generic_schema([node], parallel=True, allow_response=False),
                           '{{"tool_calls": [{{"name": "node", "arguments": {}}}]}}')):
        assert accepts(schema, calls.format(tree)) and not accepts(schema, calls.format(wrong))
        assert not accepts(schema, calls.format('{"leaf": {"id": "1"}, "children": []}'))
        assert set(schema["$defs"]) == {"arguments_0"}  # (the function without references stays inline)
        assert schema["$defs"]["arguments_0"]["default"] == {"$ref": "#/not/a/ref"}  # (data, not a reference)
    answer = node["parameters"]  # the same schema as the request's response_format, beside tools
    schema = generic_schema(FUNCTIONS, parallel=True, allow_response=True, answer=answer)
    assert accepts(schema, f'{{"response": {tree}}}') and set(schema["$defs"]) == {"answer"}
    assert call_list_schema(FUNCTIONS, parallel=True).get("$defs") is None


def test_generic_prompt_and_rendering():
    prompt = generic_system_prompt(FUNCTIONS, parallel=True, allow_response=True)
    assert "get_weather: The current weather in a city." in prompt and "- get_time" in prompt
    assert json.dumps(FUNCTIONS[0]["parameters"]) in prompt and '{"response": ' in prompt
    assert "Always call a function" in generic_system_prompt(FUNCTIONS, parallel=False, allow_response=False)
    rendered = render_generic_calls([
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}},
    ])
    assert json.loads(rendered) == {"tool_calls": [{"name": "get_weather", "arguments": {"city": "北京"}},
                                                   {"name": "get_time", "arguments": {}}]}
    assert "北京" in rendered
    assert accepts(generic_schema(FUNCTIONS, parallel=True, allow_response=False), rendered)
    _, calls = GenericFormat().extract(rendered)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "北京"}), ("get_time", {})]
