"""POST /v1/responses (OpenAI's Responses API, built on the chat endpoint) over real HTTP: one real server
process for the module (default model, float32), driven by the official `openai` client. Greedy and short,
so every Responses call can be compared with the chat call of the same conversation. Then a thinking
model (tests/scripted_model.py) for reasoning items.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from scripted_model import EOS, save_scripted_model
from scripted_server import running_scripted_server
from server_utils import running_server

from slipstream.entrypoints.openai.protocol import (
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    UsageInfo,
)
from slipstream.entrypoints.openai.serving_engine import ServingOptions
from slipstream.entrypoints.openai.serving_responses import (
    OpenAIServingResponses,
    ResponsesRequest,
    ResponseStore,
    StoredResponse,
    items_to_messages,
)

MAX_MODEL_LEN = 512
QUESTION = "What is the capital of France?"
SHORT = {"max_output_tokens": 16, "temperature": 0}
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False},
}
MESSAGE_EVENTS = ["response.output_item.added", "response.content_part.added", "response.output_text.delta",
                  "response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.fixture(scope="module")
def server():
    with running_server("--max-model-len", str(MAX_MODEL_LEN), "--enable-logprob") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=600)


def chat(client: openai.OpenAI, messages: list[dict], max_tokens: int = 16, **extra):
    return client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, temperature=0,
                                          **extra)


def assert_same_usage(response, completion) -> None:
    assert response.usage.input_tokens == completion.usage.prompt_tokens
    assert response.usage.output_tokens == completion.usage.completion_tokens
    assert response.usage.total_tokens == completion.usage.total_tokens


def collapse(types: list[str]) -> list[str]:
    """Event types with runs of the same delta event collapsed to one."""
    out: list[str] = []
    for t in types:
        if not (t.endswith(".delta") and out and out[-1] == t):
            out.append(t)
    return out


def stream_events(client: openai.OpenAI, **body) -> list:
    events = list(client.responses.create(model="m", stream=True, **body))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


# ---- plain text ----


def test_create_matches_chat(client):
    r = client.responses.create(model="m", input=QUESTION, **SHORT)
    c = chat(client, [{"role": "user", "content": QUESTION}])
    assert c.choices[0].finish_reason == "stop"
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.status == "completed" and r.incomplete_details is None
    assert r.output_text and r.output_text == c.choices[0].message.content
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert item.id.startswith("msg_")
    assert [part.type for part in item.content] == ["output_text"]
    assert_same_usage(r, c)
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.usage.input_tokens_details.cached_tokens >= 0
    assert r.max_output_tokens == 16 and r.temperature == 0 and r.tools == [] and r.tool_choice == "auto"


def test_input_items_match_chat_messages(client):
    items = [{"role": "user", "content": "Hi!"},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
             {"type": "reasoning", "id": "rs_0", "summary": []}]  # ignored as input
    r = client.responses.create(model="m", input=items, **SHORT)
    c = chat(client, [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": QUESTION}])
    assert r.output_text == c.choices[0].message.content
    assert_same_usage(r, c)


def test_timestamps_are_integers_on_the_wire(server):
    """The SDK's Response types created_at / completed_at as floats, and they went out as 1796514499.0: OpenAI sends
    integers, and strictly typed clients (a Rust u64) refused the float."""
    body = {"input": QUESTION, **SHORT}
    whole = httpx.post(f"{server.base_url}/responses", json=body, timeout=600).json()
    with httpx.stream("POST", f"{server.base_url}/responses", json={**body, "stream": True}, timeout=600) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    responses = [whole, httpx.get(f"{server.base_url}/responses/{whole['id']}", timeout=60).json(),
                 *(e["response"] for e in events if "response" in e)]
    assert len(responses) == 5  # created, in_progress, completed
    for response in responses:
        assert type(response["created_at"]) is int, response
        assert response["completed_at"] is None if response["status"] == "in_progress" else \
            type(response["completed_at"]) is int


def test_instructions_are_the_system_message(client):
    instructions = "You are a pirate. Answer like one."
    r = client.responses.create(model="m", input=QUESTION, instructions=instructions, **SHORT)
    c = chat(client, [{"role": "system", "content": instructions}, {"role": "user", "content": QUESTION}])
    assert r.output_text == c.choices[0].message.content
    assert_same_usage(r, c)
    assert r.instructions == instructions
    plain = client.responses.create(model="m", input=QUESTION, **SHORT)
    assert plain.usage.input_tokens != r.usage.input_tokens


def test_stream_events(client):
    whole = client.responses.create(model="m", input=QUESTION, **SHORT)
    events = stream_events(client, input=QUESTION, **SHORT)
    types = [e.type for e in events]
    assert collapse(types) == ["response.created", "response.in_progress", *MESSAGE_EVENTS, "response.completed"]
    created, in_progress, added, part_added = events[:4]
    assert created.response.status == in_progress.response.status == "in_progress"
    assert created.response.output == [] and created.response.id == events[-1].response.id
    item_id = added.item.id
    assert added.item.type == "message" and added.item.status == "in_progress" and added.output_index == 0
    assert (part_added.item_id, part_added.output_index, part_added.content_index) == (item_id, 0, 0)
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert all((d.item_id, d.output_index, d.content_index) == (item_id, 0, 0) for d in deltas)
    text = "".join(d.delta for d in deltas)
    [done] = [e for e in events if e.type == "response.output_text.done"]
    [part_done] = [e for e in events if e.type == "response.content_part.done"]
    [item_done] = [e for e in events if e.type == "response.output_item.done"]
    assert text == done.text == part_done.part.text == item_done.item.content[0].text == whole.output_text
    final = events[-1].response
    assert final.status == "completed" and final.output_text == text
    assert final.output[0].id == item_id and final.output[0].status == "completed"
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.output_tokens == whole.usage.output_tokens
    # Frames as OpenAI sends them: an `event:` line with each `data:` line, no [DONE].
    with httpx.stream("POST", f"{client.base_url}responses", json={"input": QUESTION, "stream": True, **SHORT},
                      timeout=600) as raw:
        assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
        frames = [f for f in raw.read().decode().split("\n\n") if f]
    assert len(frames) == len(events)
    for frame in frames:
        event_line, data_line = frame.split("\n")
        assert event_line == f"event: {json.loads(data_line.removeprefix('data: '))['type']}"


def test_stream_helper(client):
    with client.responses.stream(model="m", input=QUESTION, **SHORT) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == text
    assert text == client.responses.create(model="m", input=QUESTION, **SHORT).output_text


def test_max_output_tokens_makes_it_incomplete(client):
    r = client.responses.create(model="m", input=QUESTION, max_output_tokens=2, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 2 and r.output[-1].status == "incomplete"
    c = chat(client, [{"role": "user", "content": QUESTION}], max_tokens=2)
    assert r.output_text == c.choices[0].message.content
    events = stream_events(client, input=QUESTION, max_output_tokens=2, temperature=0)
    assert collapse([e.type for e in events])[-2:] == ["response.output_item.done", "response.incomplete"]
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.output_text == r.output_text and final.output[-1].status == "incomplete"


def test_fastdeploy_fields_pass_through_to_the_chat_request(client):
    r = client.responses.create(model="m", input=QUESTION, max_output_tokens=8, temperature=0,
                                extra_body={"response_max_tokens": 3})
    assert r.usage.output_tokens == 3 and r.status == "incomplete"
    first = chat(client, [{"role": "user", "content": QUESTION}], max_tokens=1, extra_body={"return_token_ids": True})
    banned = first.choices[0].message.model_extra["completion_token_ids"]
    r = client.responses.create(model="m", input=QUESTION, max_output_tokens=1, temperature=0,
                                extra_body={"bad_words_token_ids": banned})
    assert r.output_text != first.choices[0].message.content


# ---- store, retrieve, delete, chaining ----


def same_logprobs(got: list, want: list) -> bool:
    """Token for token; logprobs within float32 noise (a prompt from the prefix cache sums in another order)."""
    def flat(entries):
        return [(t.token, t.logprob, *[(a.token, a.logprob) for a in (t.top_logprobs or [])]) for t in entries]

    def close(a, b):
        return len(a) == len(b) and all(
            x == y if isinstance(x, str) else (close(x, y) if isinstance(x, tuple) else abs(x - y) < 1e-4)
            for x, y in zip(a, b, strict=True))

    return close(flat(got), flat(want))


def test_logprobs_through_include_are_chats(client):
    """`include: ["message.output_text.logprobs"]` with `top_logprobs` (which openai-agents and LangChain's
    Responses path send): the output text's logprobs were always [] before."""
    include = ["message.output_text.logprobs"]
    r = client.responses.create(model="m", input=QUESTION, include=include, top_logprobs=3, **SHORT)
    chat_logprobs = chat(client, [{"role": "user", "content": QUESTION}], logprobs=True, top_logprobs=3).choices[0]
    *want, end = chat_logprobs.logprobs.content  # (chat's, as vLLM's, hold the end token the answer stopped on)
    assert end.token == "<|im_end|>" and len(want) > 3
    [part] = r.output[0].content
    assert same_logprobs(part.logprobs, want)
    assert all(len(t.top_logprobs) == 3 for t in part.logprobs) and r.top_logprobs == 3
    assert "".join(t.token for t in part.logprobs) == r.output_text
    assert all(bytes(t.bytes).decode() == t.token for t in part.logprobs)

    events = stream_events(client, input=QUESTION, include=include, top_logprobs=3, **SHORT)
    streamed = [t for e in events if e.type == "response.output_text.delta" for t in e.logprobs]
    [done] = [e for e in events if e.type == "response.output_text.done"]
    assert same_logprobs(streamed, want) and same_logprobs(done.logprobs, want)
    assert same_logprobs(events[-1].response.output[0].content[0].logprobs, want)

    plain = client.responses.create(model="m", input=QUESTION, top_logprobs=3, **SHORT)  # not asked for: none
    assert plain.output[0].content[0].logprobs == []
    # Other `include` values name outputs of OpenAI's hosted tools: accepted, nothing to add.
    assert client.responses.create(model="m", input=QUESTION, include=["reasoning.encrypted_content"],
                                   **SHORT).status == "completed"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="m", input=QUESTION, include=include, top_logprobs=21, **SHORT)
    assert e.value.body["param"] == "top_logprobs"


def test_input_items_are_listed_newest_first_and_page(client):
    """client.responses.input_items.list (GET /v1/responses/{id}/input_items) was a 404."""
    items = [{"role": "user", "content": "What is the weather in Paris?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21 C"},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "And tomorrow?"}]}]
    r = client.responses.create(model="m", input=items, tools=[WEATHER_TOOL], tool_choice="none", **SHORT)
    listed = client.responses.input_items.list(r.id)
    assert [i.type for i in listed.data] == ["message", "function_call_output", "function_call", "message"]
    oldest_first = client.responses.input_items.list(r.id, order="asc").data
    assert [i.id for i in oldest_first] == [i.id for i in listed.data][::-1]
    first, call, output, last = oldest_first
    assert (first.role, first.content[0].type, first.content[0].text) == ("user", "input_text", items[0]["content"])
    assert (call.call_id, call.name, call.arguments) == ("call_1", "get_weather", '{"city": "Paris"}')
    assert (output.call_id, output.output) == ("call_1", "Sunny, 21 C") and last.content[0].text == "And tomorrow?"
    paged = [i.id for i in client.responses.input_items.list(r.id, order="asc", limit=1)]  # (the SDK pages on)
    assert paged == [i.id for i in oldest_first]
    page = client.responses.input_items.list(r.id, limit=2)
    assert page.has_more and page.first_id == listed.data[0].id and page.last_id == listed.data[1].id

    chained = client.responses.create(model="m", input="Thanks!", previous_response_id=r.id, **SHORT)
    [own] = client.responses.input_items.list(chained.id).data  # its own input, not the conversation before it
    assert own.role == "user" and own.content[0].text == "Thanks!"
    for bad, param in (({"limit": 0}, "limit"), ({"order": "up"}, "order"), ({"after": "msg_nope"}, "after")):
        with pytest.raises(openai.APIStatusError) as e:
            client.responses.input_items.list(r.id, **bad)
        assert e.value.status_code in (400, 404) and e.value.body["param"] == param
    raw = httpx.get(f"{client.base_url}responses/{r.id}/input_items", params={"limit": "null"}, timeout=60)
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "limit"  # (was FastAPI's 422 shape)
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(r.id)


def test_store_retrieve_delete(client):
    r = client.responses.create(model="m", input=QUESTION, metadata={"k": "v"}, **SHORT)
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.status == "completed"
    assert got.usage == r.usage and got.metadata == {"k": "v"}
    raw = httpx.delete(f"{client.base_url}responses/{r.id}")
    assert raw.status_code == 200
    assert raw.json() == {"id": r.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)
    again = client.responses.create(model="m", input=QUESTION, **SHORT)
    client.responses.delete(again.id)  # the SDK's delete
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(again.id)


def test_streamed_responses_are_stored(client):
    events = stream_events(client, input=QUESTION, **SHORT)
    final = events[-1].response
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_store_false_is_not_kept(client):
    r = client.responses.create(model="m", input=QUESTION, store=False, **SHORT)
    assert r.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="m", input="And Germany?", previous_response_id=r.id, **SHORT)


def test_unknown_ids_are_404_in_the_envelope(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.responses.retrieve("resp_nope")
    assert exc.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as exc:
        client.responses.create(model="m", input="Hi", previous_response_id="resp_nope", **SHORT)
    assert exc.value.body["param"] == "previous_response_id"


def test_previous_response_id_continues_the_conversation_without_its_instructions(client):
    first = client.responses.create(model="m", input=QUESTION, instructions="Answer briefly.", **SHORT)
    second = client.responses.create(model="m", input="And of Germany?", previous_response_id=first.id, **SHORT)
    assert second.previous_response_id == first.id and second.instructions is None
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first.output_text},
                {"role": "user", "content": "And of Germany?"}]
    c = chat(client, messages)
    assert second.output_text == c.choices[0].message.content
    assert_same_usage(second, c)


# ---- structured outputs ----


def test_json_schema_text_format(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    fmt = {"type": "json_schema", "name": "person", "schema": schema, "strict": True}
    r = client.responses.create(model="m", input="Describe a person as JSON.", text={"format": fmt},
                                max_output_tokens=48, temperature=0)
    assert r.status == "completed"
    person = json.loads(r.output_text)
    assert set(person) == {"name", "age"} and isinstance(person["name"], str) and isinstance(person["age"], int)
    assert r.text.format.type == "json_schema" and r.text.format.name == "person"
    events = stream_events(client, input="Describe a person as JSON.", text={"format": fmt}, max_output_tokens=48,
                           temperature=0)
    assert events[-1].response.output_text == r.output_text


def test_json_object_text_format(client):
    r = client.responses.create(model="m", input="Reply with a JSON object.", text={"format": {"type": "json_object"}},
                                max_output_tokens=32, temperature=0)
    if r.status == "completed":
        assert isinstance(json.loads(r.output_text), dict)
    else:  # cut at max_output_tokens: still the start of an object
        assert r.output_text.lstrip().startswith("{")


# ---- function tools ----


def test_required_function_call(client):
    r = client.responses.create(model="m", input="What is the weather in Paris?", tools=[WEATHER_TOOL],
                                tool_choice="required", max_output_tokens=48, temperature=0)
    assert r.status == "completed"
    calls = [item for item in r.output if item.type == "function_call"]
    assert calls and all(item.type != "message" for item in r.output)
    call = calls[0]
    assert call.name == "get_weather" and call.id.startswith("fc_") and call.call_id and call.status == "completed"
    assert "city" in json.loads(call.arguments)
    assert r.tools[0].name == "get_weather" and r.tool_choice == "required"

    # The tool's result goes back as a function_call_output item; the model answers in a message.
    follow = client.responses.create(model="m", previous_response_id=r.id, max_output_tokens=24, temperature=0,
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "Sunny, 22 degrees Celsius."}])
    assert follow.output[-1].type == "message" and follow.output_text


def test_named_function_call_streamed(client):
    events = stream_events(client, input="What is the weather in Paris?", tools=[WEATHER_TOOL],
                           tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=48,
                           temperature=0)
    types = collapse([e.type for e in events])
    assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert types[-1] == "response.completed"
    added = [e for e in events if e.type == "response.output_item.added"]
    assert added[0].item.type == "function_call" and added[0].item.name == "get_weather"
    item_id = added[0].item.id
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"
              and e.item_id == item_id]
    [done] = [e for e in events if e.type == "response.function_call_arguments.done" and e.item_id == item_id]
    assert "".join(deltas) == done.arguments
    assert "city" in json.loads(done.arguments)
    final = events[-1].response
    assert final.output[0].type == "function_call" and final.output[0].arguments == done.arguments
    assert final.output[0].call_id == added[0].item.call_id


def test_function_call_items_become_chat_tool_calls(client):
    """function_call + function_call_output input items = the chat conversation with an assistant
    tool-call message and a tool message."""
    arguments = json.dumps({"city": "Paris"})
    items = [{"role": "user", "content": "What is the weather in Paris?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": arguments},
             {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 22 degrees Celsius."}]
    r = client.responses.create(model="m", input=items, **SHORT)
    messages = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 22 degrees Celsius."}]
    c = chat(client, messages)
    assert r.output_text == c.choices[0].message.content
    assert_same_usage(r, c)


# ---- bad requests ----


@pytest.mark.parametrize(("body", "param"), [
    ({"input": QUESTION, "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": QUESTION, "tools": [{"type": "function", "name": "bad name!"}]}, "tools"),
    ({"input": QUESTION, "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"input": QUESTION, "tool_choice": "required"}, "tool_choice"),
    ({"input": QUESTION, "tools": [WEATHER_TOOL], "tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"input": 42}, "input"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input"),
    ({"input": [{"type": "function_call", "name": "get_weather"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({}, "input"),
    ({"input": QUESTION, "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": QUESTION, "temperature": -1}, "temperature"),
    ({"input": QUESTION, "text": {"format": {"type": "json_schema", "name": "x"}}}, "text"),
    ({"input": QUESTION, "text": {"format": {"type": "yaml"}}}, "text"),
    ({"input": QUESTION, "metadata": {"k": 1}}, "metadata"),
    ({"input": QUESTION, "seed": -1}, "seed"),
])
def test_bad_requests_are_400_naming_the_param(client, body, param):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as exc:
            client.post("/responses", body={**body, "stream": stream}, cast_to=httpx.Response)
        assert exc.value.status_code == 400
        assert exc.value.body["param"] == param, exc.value.body
        assert exc.value.body["type"] == "invalid_request_error"


def test_bad_tool_type_through_the_sdk(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model="m", input=QUESTION, tools=[{"type": "web_search"}], **SHORT)
    assert exc.value.body["param"] == "tools"


def test_unknown_fields_are_ignored(client):
    r = client.responses.create(model="m", input=QUESTION, extra_body={"no_such_field": 1}, truncation="disabled",
                                **SHORT)
    assert r.status == "completed"


# ---- pieces, without the server ----


def test_store_is_a_bounded_lru():
    from openai.types.responses import Response

    def stored(i: int) -> StoredResponse:
        response = Response.model_construct(id=f"resp_{i}")
        return StoredResponse(response, [], [])

    store = ResponseStore(capacity=2)
    store.put(stored(0))
    store.put(stored(1))
    assert store.get("resp_0") is not None  # now the most recently used
    store.put(stored(2))
    assert len(store) == 2 and store.get("resp_1") is None and store.get("resp_0") is not None
    assert store.delete("resp_0") and not store.delete("resp_0")


def test_consecutive_function_calls_join_one_assistant_message():
    calls = [{"type": "function_call", "call_id": f"c{i}", "name": "f", "arguments": "{}"} for i in range(2)]
    messages = items_to_messages([{"role": "user", "content": "go"}, *calls,
                                  {"type": "function_call_output", "call_id": "c0", "output": "a"},
                                  {"type": "function_call_output", "call_id": "c1", "output": "b"}])
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["c0", "c1"]
    assert [m.get("tool_call_id") for m in messages[2:]] == ["c0", "c1"]


class FakeChat:
    """Stands in for OpenAIServingChat: streams the given deltas, then raises `fail` if given."""

    options = ServingOptions("fake", False, False, 0)

    def __init__(self, deltas: list[tuple[DeltaMessage, str | None]], fail: Exception | None = None) -> None:
        self.deltas, self.fail = deltas, fail

    async def generate_chat(self, request):
        async def chunks():
            for delta, finish in self.deltas:
                yield ChatCompletionStreamResponse(id="c", created=0, model="fake", choices=[
                    ChatCompletionStreamChoice(index=0, delta=delta, finish_reason=finish)])
            if self.fail is not None:
                raise self.fail
            yield ChatCompletionStreamResponse(id="c", created=0, model="fake", choices=[],
                                               usage=UsageInfo(prompt_tokens=3, completion_tokens=4, total_tokens=7))

        return chunks()


def fake_stream(chat: FakeChat, **body) -> tuple[OpenAIServingResponses, list]:
    serving = OpenAIServingResponses(chat)
    request = ResponsesRequest.model_validate({"input": "hi", "stream": True, **body})

    async def run() -> list:
        return [e async for e in await serving.generate_stream(request)]

    events = asyncio.run(run())
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return serving, events


def test_stream_of_text_then_parallel_tool_calls():
    def call(index: int, arguments: str, name: str | None = None) -> DeltaMessage:
        piece = DeltaToolCall(index=index, id=f"call_{index}" if name else None, type="function" if name else None,
                              function=DeltaFunctionCall(name=name, arguments=arguments))
        return DeltaMessage(tool_calls=[piece])

    deltas = [(DeltaMessage(role="assistant", content=""), None), (DeltaMessage(content="Let me "), None),
              (DeltaMessage(content="check."), None), (call(0, "", "get_weather"), None), (call(0, '{"city": '), None),
              (call(0, '"Paris"}'), None), (call(1, '{"city": "Rome"}', "get_weather"), "tool_calls")]
    serving, events = fake_stream(FakeChat(deltas), tools=[WEATHER_TOOL])
    assert collapse([e.type for e in events]) == [
        "response.created", "response.in_progress", *MESSAGE_EVENTS,
        "response.output_item.added", "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    final = events[-1].response
    assert [item.type for item in final.output] == ["message", "function_call", "function_call"]
    assert final.output_text == "Let me check."
    assert [(c.call_id, c.name, c.arguments) for c in final.output[1:]] == [
        ("call_0", "get_weather", '{"city": "Paris"}'), ("call_1", "get_weather", '{"city": "Rome"}')]
    for index, item in enumerate(final.output):
        assert {e.output_index for e in events if getattr(e, "item_id", None) == item.id} <= {index}
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.total_tokens) == (3, 4, 7)
    # The stored conversation: one assistant message with the text and both calls.
    conversation = serving.store.get(final.id).conversation
    assert [m["role"] for m in conversation] == ["user", "assistant"]
    assert conversation[1]["content"] == "Let me check."
    assert [c["id"] for c in conversation[1]["tool_calls"]] == ["call_0", "call_1"]


def test_a_failure_mid_stream_is_an_error_event_and_the_end():
    deltas = [(DeltaMessage(role="assistant", content=""), None), (DeltaMessage(content="Hel"), None)]
    serving, events = fake_stream(FakeChat(deltas, fail=ValueError("the engine broke")))
    assert [e.type for e in events] == ["response.created", "response.in_progress", "response.output_item.added",
                                        "response.content_part.added", "response.output_text.delta", "error"]
    assert events[-1].message == "the engine broke" and events[-1].code == "invalid_request_error"
    assert len(serving.store) == 0


def test_an_empty_answer_is_still_a_message():
    _, events = fake_stream(FakeChat([(DeltaMessage(role="assistant", content=""), "stop")]))
    assert [e.type for e in events] == ["response.created", "response.in_progress", "response.output_item.added",
                                        "response.content_part.added", "response.output_text.done",
                                        "response.content_part.done", "response.output_item.done",
                                        "response.completed"]
    assert events[-1].response.output_text == ""


# ---- a thinking model: reasoning items ----

THINKING = "Two plus two means adding two to two, which makes four.\n"
ANSWER = "The answer is four."
THINKING_QUESTION = "What is two plus two?"


@pytest.fixture(scope="module")
def thinking_client(tmp_path_factory):
    model_dir = save_scripted_model(tmp_path_factory.mktemp("scripted"),
                                    [f"assistant\n<think>\n{THINKING}</think>\n\n{ANSWER}{EOS}"],
                                    texts=["user\n", THINKING_QUESTION])
    with running_scripted_server("--model", str(model_dir), "--reasoning-parser", "qwen3",
                                 "--kv-cache-memory", "16MiB") as server:
        yield openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=600)


def test_reasoning_item(thinking_client):
    r = thinking_client.responses.create(model="scripted", input=THINKING_QUESTION, temperature=0,
                                         reasoning={"effort": "medium"})
    assert [item.type for item in r.output] == ["reasoning", "message"]
    reasoning = r.output[0]
    assert reasoning.id.startswith("rs_") and reasoning.summary == []
    assert [c.text for c in reasoning.content] == [THINKING.strip()]
    assert r.output_text == ANSWER
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    assert r.reasoning.effort == "medium"

    events = stream_events(thinking_client, input=THINKING_QUESTION, temperature=0)
    assert collapse([e.type for e in events]) == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        *MESSAGE_EVENTS, "response.completed"]
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    [done] = [e for e in events if e.type == "response.reasoning_text.done"]
    assert thought.strip() == done.text.strip() == THINKING.strip()
    assert {e.output_index for e in events if e.type == "response.output_text.delta"} == {1}
    final = events[-1].response
    assert [item.type for item in final.output] == ["reasoning", "message"] and final.output_text == ANSWER
    assert final.usage.output_tokens_details.reasoning_tokens == r.usage.output_tokens_details.reasoning_tokens

    # Chaining drops the thinking, as chat clients do: the next turn's prompt holds only the answer.
    again = thinking_client.responses.create(model="scripted", input=THINKING_QUESTION, temperature=0,
                                             previous_response_id=r.id)
    assert again.status == "completed"


def test_logprobs_on_a_server_without_enable_logprob_are_400_naming_include(thinking_client):
    with pytest.raises(openai.BadRequestError) as e:
        thinking_client.responses.create(model="scripted", input=THINKING_QUESTION,
                                         include=["message.output_text.logprobs"])
    assert e.value.body["param"] == "include" and "--enable-logprob" in e.value.body["message"]
