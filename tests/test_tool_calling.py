"""Tool calling on the default model, whose ChatML template knows nothing of tools: the server
describes them in a system message and the grammar makes every call well formed (llama.cpp's generic
format). Driven by the official `openai` client and by LangChain's ChatOpenAI over real HTTP.
"""

from __future__ import annotations

import json

import openai
import pytest
from langchain_core.messages import AIMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field
from server_utils import running_server

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a timezone",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 30}},
                       "required": ["timezone"], "additionalProperties": False},
    },
}
TOOLS = [WEATHER, TIME]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server():
    with running_server("--max-model-len", "1024") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=600)


def check_call(name: str, arguments: str) -> dict:
    """The call names a tool and its arguments validate against that tool's schema."""
    args = json.loads(arguments)
    if name == "get_weather":
        assert set(args) == {"city", "unit"} and isinstance(args["city"], str)
        assert args["unit"] in ("celsius", "fahrenheit")
    else:
        assert name == "get_time" and set(args) == {"timezone"}
    return args


def reassemble(chunks) -> tuple[str, list[tuple[str, str, str]], str | None]:
    """(content, [(id, name, arguments)], finish_reason) of a streamed chat; checks the delta shapes."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            if d.index not in calls:
                assert d.id and d.id.startswith("call_") and d.type == "function" and d.function.name
                calls[d.index] = [d.id, d.function.name, ""]
            else:
                assert d.id is None and d.function.name is None
            calls[d.index][2] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [tuple(c) for _, c in sorted(calls.items())], finish


def create(client, stream: bool = False, **kwargs):
    return client.chat.completions.create(**{"model": "default", "messages": QUESTION, "tools": TOOLS,
                                             "temperature": 0, "max_tokens": 80, "stream": stream, **kwargs})


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_calls_are_valid_streamed_or_not(client, tool_choice):
    response = create(client, tool_choice=tool_choice)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and len({c.id for c in calls}) == len(calls)
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        check_call(c.function.name, c.function.arguments)
    if isinstance(tool_choice, dict):
        assert [c.function.name for c in calls] == ["get_time"]
    content, streamed, finish = reassemble(create(client, stream=True, tool_choice=tool_choice))
    assert (content, finish) == ("", "tool_calls")
    assert [(name, args) for _, name, args in streamed] == [(c.function.name, c.function.arguments) for c in calls]


def test_the_sdk_stream_helper_accumulates_the_calls(client):
    """`client.chat.completions.stream` merges each delta into a snapshot: the later pieces of a call carried
    `"type": null` (and `"id": null`, `"name": null`), which overwrote the first piece's and failed the helper's
    assertion that a call's type is "function", on every streamed call."""
    with client.chat.completions.stream(model="default", messages=QUESTION, tools=TOOLS, tool_choice="required",
                                        temperature=0, max_tokens=80) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls" and final.message.tool_calls
    for c in final.message.tool_calls:
        assert c.type == "function" and c.id.startswith("call_")
        check_call(c.function.name, c.function.arguments)


def test_a_named_choice_is_one_call_to_it(client):
    """The generic format's list of calls held any number of calls to the named function (two identical ones at
    temperature 0, or a second one cut off at max_tokens): a named choice is one call, as vLLM's is."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(3):
        choice = create(client, tool_choice=named, temperature=1.0, seed=seed).choices[0]
        assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"], choice.message.tool_calls
        check_call("get_weather", choice.message.tool_calls[0].function.arguments)


class Joke(BaseModel):
    setup: str
    punchline: str


def test_an_answer_beside_tools_follows_the_response_format(client):
    """With tools and tool_choice auto, the generic format's grammar replaced the request's response_format: an
    answer came back as prose (`parse` raised on it). Now the answer is a value of the schema: each reply is calls
    or a Joke, streamed or not."""
    answers = 0
    for seed in range(3):
        kwargs = dict(model="default", messages=[{"role": "user", "content": "Tell me a joke"}], temperature=1.0,
                      tools=[{**t, "function": {**t["function"], "strict": True}} for t in TOOLS],  # (parse wants it)
                      seed=seed, max_tokens=120)
        choice = client.chat.completions.parse(response_format=Joke, **kwargs).choices[0]
        if choice.message.tool_calls:
            continue
        answers += 1
        assert choice.finish_reason == "stop" and choice.message.parsed == Joke.model_validate_json(
            choice.message.content)
        with client.chat.completions.stream(response_format=Joke, **kwargs) as stream:
            streamed = stream.get_final_completion().choices[0].message
        assert (streamed.content, streamed.parsed) == (choice.message.content, choice.message.parsed)
    assert answers, "every reply was a call: nothing checked the answers' format"
    with pytest.raises(openai.BadRequestError) as e:  # (a regex cannot share the calls' JSON grammar)
        client.chat.completions.create(model="default", messages=QUESTION, tools=TOOLS, max_tokens=4,
                                       extra_body={"guided_regex": "[a-z]+"})
    assert e.value.body["param"] == "guided_regex"


class Address(BaseModel):
    city: str = Field(max_length=30)
    country: str = Field(max_length=30)


class Resident(BaseModel):
    name: str = Field(max_length=30)
    address: Address  # (pydantic writes it as {"$ref": "#/$defs/Address"}, with "$defs" at the schema's root)


def test_tools_whose_schemas_refer_to_their_own_definitions(client):
    """pydantic's schemas of nested models (what instructor, pydantic-ai and `openai.pydantic_function_tool` send)
    keep the nested models in "$defs" and refer to them: pasted below the calls' list, those references pointed at
    the list's root: a 400 ("Cannot find field '$defs'"). Each call's arguments are now a valid instance of the
    model, however calls are asked for, and so is an answer in such a response_format beside the tools."""
    tools = [openai.pydantic_function_tool(Resident, name="save_person"),
             {**TIME, "function": {**TIME["function"], "strict": True}}]  # (parse wants every tool strict)
    assert "$defs" in tools[0]["function"]["parameters"]
    messages = [{"role": "user", "content": "Ann lives in Paris, France. Save her."}]
    for tool_choice in ("required", {"type": "function", "function": {"name": "save_person"}}, "auto"):
        choice = client.chat.completions.parse(model="default", messages=messages, tools=tools, temperature=0,
                                               max_tokens=120, tool_choice=tool_choice).choices[0]
        calls = [c for c in choice.message.tool_calls or [] if c.function.name == "save_person"]
        assert tool_choice == "auto" or calls, choice
        for call in calls:
            assert call.function.parsed_arguments == Resident.model_validate_json(call.function.arguments)
    answered = client.chat.completions.parse(model="default", messages=[{"role": "user", "content": "Who is Ann?"}],
                                             tools=tools, response_format=Resident, temperature=0, max_tokens=120,
                                             parallel_tool_calls=False)  # (else it calls get_time on and on)
    message = answered.choices[0].message
    assert message.tool_calls or message.parsed == Resident.model_validate_json(message.content)


def test_parallel_tool_calls_false_gives_one_call(client):
    calls = create(client, tool_choice="required", parallel_tool_calls=False).choices[0].message.tool_calls
    assert len(calls) == 1


def test_auto_answers_text_or_calls_in_the_generic_format(client):
    """Under the generic format's grammar, auto gives text or valid calls, never the JSON itself."""
    for messages in (QUESTION, [{"role": "user", "content": "Say hello to me."}]):
        choice = create(client, messages=messages, tool_choice="auto").choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason in ("tool_calls", "length") and choice.message.content is None
            for c in choice.message.tool_calls[:-1]:
                check_call(c.function.name, c.function.arguments)
        else:
            assert choice.message.content and not choice.message.content.startswith("{")
        content, calls, finish = reassemble(create(client, stream=True, messages=messages, tool_choice="auto"))
        assert content == (choice.message.content or "") and finish == choice.finish_reason
        assert [(n, a) for _, n, a in calls] == [(c.function.name, c.function.arguments)
                                                 for c in choice.message.tool_calls]


def test_tool_result_round_trip(client, server):
    call = create(client, tool_choice="required", parallel_tool_calls=False).choices[0].message.tool_calls[0]
    messages = [*QUESTION,
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "cloudy"})}]
    answer = create(client, messages=messages, tool_choice="none").choices[0]
    assert answer.message.content and not answer.message.tool_calls
    # auto after a result: valid either way (a small model may call again).
    again = create(client, messages=messages, tool_choice="auto").choices[0]
    assert again.message.content or again.message.tool_calls


def test_startup_log_names_the_tool_format(server):
    assert "tool calls: the chat template knows no tools" in server.log()


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"tool_choice": {"type": "function", "function": {"name": "no_such_function"}}}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
])
def test_bad_tools_are_400s(client, server, kwargs, param):
    body = {"model": "default", "messages": QUESTION, "tools": TOOLS, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**body)
    assert info.value.body["param"] == param, info.value.body
    assert server.process.poll() is None


# ---- LangChain's ChatOpenAI against the real server ----


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str = Field(max_length=30, description="the city")


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int


@pytest.fixture(scope="module")
def chat_model(server):
    return ChatOpenAI(base_url=server.base_url, api_key="unused", model="default", temperature=0, max_tokens=80,
                      max_retries=0)


def test_langchain_bind_tools(chat_model):
    message = chat_model.bind_tools([GetWeather], tool_choice="required").invoke("What is the weather in Paris?")
    assert isinstance(message, AIMessage)
    assert message.tool_calls and message.tool_calls[0]["name"] == "GetWeather"
    assert isinstance(message.tool_calls[0]["args"]["city"], str)
    streamed = None
    for chunk in chat_model.bind_tools([GetWeather], tool_choice="GetWeather").stream("Weather in Rome?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.tool_calls[0]["name"] == "GetWeather" and "city" in streamed.tool_calls[0]["args"]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(chat_model, method):
    person = chat_model.with_structured_output(Person, method=method).invoke(
        "Invent a person and give their name and age as JSON.")
    assert isinstance(person, Person)
