"""The OpenAI-compatible server over real HTTP: one real server process for the module (default model,
float32, --enable-logprob), driven by the official `openai` client and raw httpx.

Generations stay a few tokens long; most are greedy so assertions can compare runs with each other. The
128-token context also bounds the seed's examples, which ask for no max_tokens.
"""

from __future__ import annotations

import json
import math
import socket
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_utils import SEED_MESSAGES, running_server

from slipstream.entrypoints.openai.protocol import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS

MAX_MODEL_LEN = 128
MAX_BODY_SIZE = 2**20
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    with running_server("--enable-logprob", "--max-model-len", str(MAX_MODEL_LEN),
                        "--max-body-size", str(MAX_BODY_SIZE), "--trust-request-chat-template") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=600) as c:
        yield c


def sse(response: httpx.Response) -> list:
    """The `data:` payloads of an SSE response, JSON-decoded except the final [DONE]."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events


def stream(http: httpx.Client, path: str, body: dict) -> list:
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse(r)


def post(http: httpx.Client, path: str, body: dict, status: int = 200) -> dict:
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    return r.json()


def tokenize(http: httpx.Client, **body) -> list[int]:
    return post(http, "/tokenize", body)["tokens"]


def detokenize(http: httpx.Client, ids: list[int]) -> str:
    return post(http, "/detokenize", {"tokens": ids})["prompt"]


def metric_samples(http: httpx.Client) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value, from /metrics parsed by prometheus_client's parser."""
    r = http.get("/metrics")
    assert r.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def metric(samples: dict[tuple, float], name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


# ---- the seed's examples, as written (port adjusted) ----


def test_seed_curl_chat_request(server):
    # curl -X POST ".../v1/chat/completions" -H "Content-Type: application/json" -d '{...}'
    body = '{\n  "messages": [\n    {"role": "user", "content": "Hello!"}\n  ]\n}'
    r = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"},
                   timeout=600)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert out["choices"][0]["message"]["content"].strip()
    assert out["choices"][0]["finish_reason"] in ("stop", "length")


def test_seed_curl_logprobs_request_is_malformed_json_and_gets_a_400(server):
    body = ('{\n  "messages": [\n    {"role": "user", "content": "Hello!"},\n    "logprobs": true,\n'
            '    "top_logprobs": 5\n  ]\n}')
    r = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "not valid JSON" in error["message"] and "line 4" in error["message"]


def test_seed_curl_logprobs_request_corrected_returns_5_top_logprobs_per_token(server):
    body = ('{\n  "messages": [\n    {"role": "user", "content": "Hello!"}\n  ],\n  "logprobs": true,\n'
            '  "top_logprobs": 5\n}')
    r = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"},
                   timeout=600)
    assert r.status_code == 200, r.text
    out = r.json()
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == out["usage"]["completion_tokens"] > 0
    for entry in content:
        assert len(entry["top_logprobs"]) == 5
        assert entry["logprob"] <= entry["top_logprobs"][0]["logprob"] + 1e-6


def test_seed_python_streaming_example(server, capsys):
    host, port = "127.0.0.1", server.url.rsplit(":", 1)[1]
    client = openai.Client(base_url=f"http://{host}:{port}/v1", api_key="null")
    response = client.chat.completions.create(
        model="null",
        messages=SEED_MESSAGES,
        stream=True,
    )
    for chunk in response:
        if chunk.choices[0].delta:
            print(chunk.choices[0].delta.content, end='')
    print('\n')
    printed = capsys.readouterr().out
    assert "None" not in printed  # every chunk's delta carries content, the first one ""
    assert printed.strip()  # (sampled at temperature 1 without a seed: its words vary from run to run)


# ---- chat: response fields ----


def test_chat_response_fields_and_usage(client, http):
    r = client.chat.completions.create(model="any-name", messages=QUESTION, max_tokens=4, temperature=0)
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion"
    assert abs(r.created - time.time()) < 600
    assert r.model == http.get("/v1/models").json()["data"][0]["id"]
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.reasoning_content is None
    assert choice.finish_reason == "length"
    prompt_ids = tokenize(http, messages=QUESTION)
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == 4
    assert r.usage.total_tokens == r.usage.prompt_tokens + 4
    assert 0 <= r.usage.prompt_tokens_details.cached_tokens <= r.usage.prompt_tokens
    assert r.usage.completion_tokens_details.reasoning_tokens == 0


def test_chat_answers_the_question(client):
    r = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=12)
    assert "Paris" in r.choices[0].message.content


def test_chat_return_token_ids_non_stream(client, http):
    r = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=5,
                                       extra_body={"return_token_ids": True})
    message = r.choices[0].message
    assert message.prompt_token_ids == tokenize(http, messages=QUESTION)
    assert len(message.completion_token_ids) == r.usage.completion_tokens == 5
    assert detokenize(http, message.completion_token_ids) == message.content


def test_chat_stream_chunks(http):
    events = stream(http, "/v1/chat/completions", {"messages": QUESTION, "temperature": 0, "max_tokens": 5,
                                                   "return_token_ids": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    first, rest = chunks[0]["choices"][0], [c["choices"][0] for c in chunks[1:]]
    assert first["delta"]["role"] == "assistant"
    assert first["delta"]["prompt_token_ids"] == tokenize(http, messages=QUESTION)
    assert all(c["delta"]["prompt_token_ids"] is None and c["delta"]["role"] is None for c in rest)
    ids = [t for c in rest for t in c["delta"]["completion_token_ids"]]
    assert len(ids) == 5
    assert [c["finish_reason"] for c in rest] == [None] * (len(rest) - 1) + ["length"]
    times = [c["arrival_time"] for c in rest]
    assert all(t >= 0 for t in times) and times == sorted(times)
    assert all(c["usage"] is None for c in chunks)
    text = "".join(c["delta"]["content"] for c in rest)
    assert text == detokenize(http, ids)


def test_chat_stream_equals_non_stream_with_seed(client):
    kwargs = dict(model="x", messages=QUESTION, temperature=1.0, seed=1234, max_tokens=6, logprobs=True,
                  top_logprobs=2, extra_body={"return_token_ids": True})
    full = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert again.choices[0].message.content == full.choices[0].message.content  # the seed reproduces
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == full.choices[0].message.content
    streamed_ids = [t for c in chunks for t in (c.choices[0].delta.model_extra.get("completion_token_ids") or [])]
    assert streamed_ids == full.choices[0].message.completion_token_ids
    streamed_lps = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    full_lps = full.choices[0].logprobs.content
    assert [e.token for e in streamed_lps] == [e.token for e in full_lps]
    for s, f in zip(streamed_lps, full_lps, strict=True):
        assert s.logprob == pytest.approx(f.logprob, abs=1e-4)
        assert [t.token for t in s.top_logprobs] == [t.token for t in f.top_logprobs]


def test_chat_stream_include_usage(client, http):
    chunks = list(client.chat.completions.create(model="x", messages=QUESTION, max_tokens=3, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.completion_tokens == 3
    assert last.usage.prompt_tokens == len(tokenize(http, messages=QUESTION))
    assert last.usage.total_tokens == last.usage.prompt_tokens + 3


def test_chat_stream_continuous_usage_stats(http):
    events = stream(http, "/v1/chat/completions", {
        "messages": QUESTION, "max_tokens": 3, "temperature": 0,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    chunks = events[:-1]
    assert all(c["usage"] is not None for c in chunks)
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 3


def test_chat_logprobs_fields(client):
    r = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=3, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert e.bytes == list(e.token.encode())
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(t <= 0 for t in tops)
        assert e.top_logprobs[0].token == e.token  # greedy picks the most likely token
        assert e.logprob == pytest.approx(tops[0])
        assert math.exp(tops[0]) + math.exp(tops[1]) + math.exp(tops[2]) <= 1 + 1e-5


def test_chat_logprobs_without_top_logprobs(client):
    r = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=2, logprobs=True)
    assert [e.top_logprobs for e in r.choices[0].logprobs.content] == [[], []]


def test_chat_max_tokens_one_gives_exactly_one_token(client):
    r = client.chat.completions.create(model="x", messages=QUESTION, max_tokens=1)
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "length"


def test_chat_max_completion_tokens(client):
    r = client.chat.completions.create(model="x", messages=QUESTION, max_completion_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


def test_chat_max_tokens_past_the_context_is_clamped(client):
    prompt = [1] * (MAX_MODEL_LEN - 3)
    r = client.chat.completions.create(model="x", messages=QUESTION, max_tokens=1000,
                                       extra_body={"prompt_token_ids": prompt, "ignore_eos": True})
    assert r.usage.prompt_tokens == MAX_MODEL_LEN - 3
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_chat_min_tokens_and_ignore_eos(client):
    short = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]
    natural = client.chat.completions.create(model="x", messages=short, temperature=0, max_tokens=12)
    n = natural.usage.completion_tokens
    assert natural.choices[0].finish_reason == "stop" and n < 10  # the model ends early on its own
    longer = client.chat.completions.create(model="x", messages=short, temperature=0, max_tokens=n + 2,
                                            extra_body={"min_tokens": n + 2})
    assert longer.usage.completion_tokens == n + 2 and longer.choices[0].finish_reason == "length"
    ignored = client.chat.completions.create(model="x", messages=short, temperature=0, max_tokens=n + 2,
                                             extra_body={"ignore_eos": True})
    assert ignored.usage.completion_tokens == n + 2


def test_chat_stop_strings(client):
    base = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=8)
    text = base.choices[0].message.content
    stop = text.split()[2]  # a word in the middle
    cut = text.index(stop)
    r = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=8, stop=[stop])
    assert r.choices[0].message.content == text[:cut] and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=8, stop=stop,
                                       extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].message.content == text[: cut + len(stop)] and r.choices[0].finish_reason == "stop"


def test_chat_stop_token_ids(client):
    base = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=6,
                                          extra_body={"return_token_ids": True})
    ids = base.choices[0].message.completion_token_ids
    r = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=6,
                                       extra_body={"return_token_ids": True, "stop_token_ids": [ids[2]]})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.completion_token_ids == ids[: ids.index(ids[2]) + 1]


def test_chat_logit_bias_and_bad_words(client, http):
    base = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=2,
                                          extra_body={"return_token_ids": True})
    first = base.choices[0].message.completion_token_ids[0]
    forced = tokenize(http, prompt=" Bonjour", add_special_tokens=False)[0]
    r = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=2,
                                       logit_bias={str(forced): 100}, extra_body={"return_token_ids": True})
    assert r.choices[0].message.completion_token_ids == [forced, forced]
    word = detokenize(http, [first]).strip()
    r = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=2,
                                       extra_body={"return_token_ids": True, "bad_words": [word]})
    assert r.choices[0].message.completion_token_ids[0] != first


def test_chat_sampling_knobs(client):
    greedy = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=4)
    top_k_1 = client.chat.completions.create(model="x", messages=QUESTION, temperature=1.5, max_tokens=4, seed=7,
                                             extra_body={"top_k": 1})
    assert top_k_1.choices[0].message.content == greedy.choices[0].message.content
    tiny_top_p = client.chat.completions.create(model="x", messages=QUESTION, temperature=1.5, top_p=1e-6,
                                                max_tokens=4, seed=7)
    assert tiny_top_p.choices[0].message.content == greedy.choices[0].message.content
    high_min_p = client.chat.completions.create(model="x", messages=QUESTION, temperature=1.5, max_tokens=4,
                                                seed=7, extra_body={"min_p": 1.0})
    assert high_min_p.choices[0].message.content == greedy.choices[0].message.content


def test_chat_penalties_change_a_repetitive_greedy_output(client):
    repeat = [{"role": "user", "content": "Write the word 'cat' ten times, separated by spaces."}]
    base = client.chat.completions.create(model="x", messages=repeat, temperature=0, max_tokens=8)
    for knob in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra_body": {"repetition_penalty": 3.0}}):
        r = client.chat.completions.create(model="x", messages=repeat, temperature=0, max_tokens=8, **knob)
        assert r.choices[0].message.content != base.choices[0].message.content, knob


def test_chat_n_2(client):
    r = client.chat.completions.create(model="x", messages=QUESTION, n=2, max_tokens=3, seed=5, user="tester")
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(model="x", messages=QUESTION, n=2, max_tokens=3, seed=5,
                                                 stream=True))
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == r.choices[i].message.content
        assert mine[-1].finish_reason == "length"


def test_chat_template_kwargs_and_enable_thinking(client, http):
    template = "thinking={{ enable_thinking }};{% for m in messages %}{{ m['content'] }}{% endfor %}"

    def rendered(**extra) -> str:
        r = client.chat.completions.create(model="x", messages=QUESTION, max_tokens=1,
                                           extra_body={"chat_template": template, "return_token_ids": True, **extra})
        return detokenize(http, r.choices[0].message.prompt_token_ids)

    assert rendered().startswith("thinking=True;What is the capital")
    assert rendered(enable_thinking=False).startswith("thinking=False;")
    assert rendered(enable_thinking=False, chat_template_kwargs={"enable_thinking": True}).startswith(
        "thinking=True;")


def test_chat_extras_accepted(client):
    r = client.chat.completions.create(
        model="x", messages=[{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                             {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        max_tokens=2, extra_body={"reasoning_max_tokens": 1, "enable_thinking": True, "some_unknown_field": 1})
    assert r.choices[0].message.reasoning_content is None and r.choices[0].message.content


def test_chat_prompt_token_ids_overrides_messages(client, http):
    ids = tokenize(http, messages=QUESTION)
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "ignored"}], temperature=0,
                                       max_tokens=4, extra_body={"prompt_token_ids": ids})
    base = client.chat.completions.create(model="x", messages=QUESTION, temperature=0, max_tokens=4)
    assert r.choices[0].message.content == base.choices[0].message.content
    assert r.usage.prompt_tokens == len(ids)


# ---- completions ----

PROMPT = "The capital of France is"


def test_completion_fields_default_max_tokens_16(client):
    r = client.completions.create(model="x", prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"
    assert r.choices[0].index == 0 and r.choices[0].text


def test_completion_prompt_forms(client, http):
    ids = tokenize(http, prompt=PROMPT)
    text = client.completions.create(model="x", prompt=PROMPT, temperature=0, max_tokens=3).choices[0].text
    by_ids = client.completions.create(model="x", prompt=ids, temperature=0, max_tokens=3)
    assert by_ids.choices[0].text == text and by_ids.usage.prompt_tokens == len(ids)
    override = client.completions.create(model="x", prompt="ignored", temperature=0, max_tokens=3,
                                         extra_body={"prompt_token_ids": ids})
    assert override.choices[0].text == text
    batch = client.completions.create(model="x", prompt=[ids, tokenize(http, prompt="1, 2, 3,")], temperature=0,
                                      max_tokens=3, n=2)
    assert [c.index for c in sorted(batch.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    assert {c.text for c in batch.choices if c.index < 2} == {text}
    assert batch.usage.prompt_tokens == len(ids) + len(tokenize(http, prompt="1, 2, 3,"))
    assert batch.usage.completion_tokens == 12
    strings = client.completions.create(model="x", prompt=[PROMPT, "1, 2, 3,"], temperature=0, max_tokens=3)
    assert sorted(c.text for c in strings.choices) == sorted(c.text for c in batch.choices if c.index % 2 == 0)


def test_completion_echo(client, http):
    r = client.completions.create(model="x", prompt=PROMPT, temperature=0, max_tokens=3, echo=True)
    plain = client.completions.create(model="x", prompt=PROMPT, temperature=0, max_tokens=3)
    assert r.choices[0].text == PROMPT + plain.choices[0].text
    events = stream(http, "/v1/completions", {"prompt": PROMPT, "temperature": 0, "max_tokens": 3, "echo": True})
    assert events[0]["choices"][0]["text"] == PROMPT
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == r.choices[0].text


def test_completion_echo_with_logprobs_scores_the_prompt(http):
    ids = tokenize(http, prompt=PROMPT)
    first = post(http, "/v1/completions", {"prompt": ids, "temperature": 0, "max_tokens": 1, "logprobs": 0,
                                           "return_token_ids": True})["choices"][0]
    # Echo the prompt plus the token the model chose after it: that token's echoed logprob is the one
    # the model gave it when it generated it.
    prompt = ids + first["completion_token_ids"]
    body = {"prompt": prompt, "temperature": 0, "max_tokens": 2, "logprobs": 2, "echo": True}
    full = post(http, "/v1/completions", body)["choices"][0]
    lp = full["logprobs"]
    n = len(prompt)
    assert len(lp["tokens"]) == n + 2 and "".join(lp["tokens"]) == full["text"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing scores the first token
    assert all(v <= 0 for v in lp["token_logprobs"][1:])
    assert abs(lp["token_logprobs"][n - 1] - first["logprobs"]["token_logprobs"][0]) < 1e-4
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(n + 2)]
    events = stream(http, "/v1/completions", body)
    streamed = [t for e in events[:-1] for c in e["choices"] if c.get("logprobs") for t in c["logprobs"]["tokens"]]
    assert streamed == lp["tokens"]


def test_completion_legacy_logprobs_stream_and_non_stream(client, http):
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": 4, "logprobs": 2, "return_token_ids": True}
    full = post(http, "/v1/completions", body)["choices"][0]
    lp = full["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 4
    assert "".join(lp["tokens"]) == full["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(4)]
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert token in top and top[token] == pytest.approx(logprob) and logprob <= 0
        assert len(top) in (2, 3)  # the top 2, plus the sampled token when it is not among them
    assert full["completion_token_ids"] and len(full["prompt_token_ids"]) == len(tokenize(http, prompt=PROMPT))
    events = stream(http, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [e["choices"][0] for e in events[:-1]]
    assert chunks[0]["prompt_token_ids"] == full["prompt_token_ids"]
    streamed = [c for c in chunks if c["logprobs"]]
    assert [t for c in streamed for t in c["logprobs"]["tokens"]] == lp["tokens"]
    assert [o for c in streamed for o in c["logprobs"]["text_offset"]] == lp["text_offset"]
    assert [x for c in streamed for x in c["logprobs"]["token_logprobs"]] == pytest.approx(lp["token_logprobs"],
                                                                                        abs=1e-4)
    assert [t for c in chunks for t in c["completion_token_ids"] or []] == full["completion_token_ids"]


def test_completion_stream_include_usage(client):
    chunks = list(client.completions.create(model="x", prompt=PROMPT, max_tokens=2, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2
    assert all(c.usage is None for c in chunks[:-1])


# ---- errors ----

INVALID_CHAT = [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"n": 0}, "n"),
    ({"seed": -1}, "seed"),
    ({"reasoning_max_tokens": 0}, "reasoning_max_tokens"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, None),
    ({"stream_options": {"include_usage": True}}, None),
    ({"stop": ""}, "stop"),
    ({"stop_token_ids": [10**7]}, "stop_token_ids"),
    ({"logit_bias": {"10000000": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"prompt_token_ids": [10**7]}, "prompt_token_ids"),
    ({"stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop"),
    ({"stop": "x" * (MAX_STOP_STRING_CHARS + 1)}, "stop"),
    ({"bad_words": ["x" * (MAX_STOP_STRING_CHARS + 1)]}, "bad_words"),
    ({"n": 129}, "n"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages"),
    ({"messages": [{"role": "system", "content": None}, *QUESTION]}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages"),
    ({"chat_template_kwargs": {"chat_template": "x", "tokenize": True}}, "chat_template_kwargs"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": None}, None),
]


@pytest.mark.parametrize(("fields", "param"), INVALID_CHAT, ids=[json.dumps(f) for f, _ in INVALID_CHAT])
def test_chat_invalid_values_are_400(http, fields, param):
    """Each is a 400 whose message names the field; `param` names it too when one field alone is wrong."""
    error = post(http, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 1, **fields}, 400)["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    name = param or next(iter(fields))
    assert name.replace("_", " ") in error["message"].replace("_", " ")


INVALID_COMPLETION = [
    ({"logprobs": 21}, "logprobs"),
    ({"prompt": []}, None),
    ({"prompt": None}, None),
    ({"prompt": [[1, 2], "mixed"]}, "prompt"),
    ({"prompt": ""}, None),
]


@pytest.mark.parametrize(("fields", "param"), INVALID_COMPLETION, ids=[json.dumps(f) for f, _ in INVALID_COMPLETION])
def test_completion_invalid_values_are_400(http, fields, param):
    error = post(http, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1, **fields}, 400)["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param


def test_bodies_that_are_not_json_objects_are_400(http):
    for body in (b"[1, 2]", b"", b"{", b"null"):
        r = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_body_over_the_size_limit_is_413(http):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * MAX_BODY_SIZE}]}).encode()
    r = http.post("/v1/chat/completions", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit is found while the body arrives
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    r = http.post("/v1/chat/completions", content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert post(http, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 1})["choices"]


def test_deeply_nested_json_is_400(http):
    for depth in (50_000, 300):
        body = '{"messages": [{"role": "user", "content": "hi"}], "metadata": ' + "[" * depth + "]" * depth + "}"
        r = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    # A deep but parseable JSON schema compiles or is refused: never a 500.
    schema = {}
    for _ in range(60):
        schema = {"type": "array", "items": schema}
    body = {"messages": QUESTION, "max_tokens": 4,
            "response_format": {"type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code in (200, 400), r.text


UNUSUAL_TEXT = "a\x00b\x01c\x1b[31m 静夜思 😀\u200b\ufeff e\u0301 \U0001f1eb\U0001f1f7"


def test_unusual_characters_round_trip(http):
    """NUL and other control characters, CJK, emoji, zero-width and combining characters: tokenized and
    detokenized unchanged, and a prompt holding them is served."""
    assert detokenize(http, tokenize(http, prompt=UNUSUAL_TEXT, add_special_tokens=False)) == UNUSUAL_TEXT
    body = {"messages": [{"role": "user", "content": UNUSUAL_TEXT}], "max_tokens": 3}
    assert post(http, "/v1/chat/completions", body)["choices"][0]["message"]["content"] is not None
    out = post(http, "/v1/completions", {"prompt": UNUSUAL_TEXT, "max_tokens": 2, "echo": True})
    assert out["choices"][0]["text"].startswith(UNUSUAL_TEXT)


def test_prompt_longer_than_the_context_is_400_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="x", prompt=[1] * (MAX_MODEL_LEN + 8), max_tokens=1)
    error = e.value.body
    assert e.value.status_code == 400 and error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert str(MAX_MODEL_LEN + 8) in error["message"] and str(MAX_MODEL_LEN) in error["message"]


def test_unknown_route_and_method_are_enveloped(http):
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_any_model_name_is_accepted_without_served_model_name(client):
    assert client.chat.completions.create(model="null", messages=QUESTION, max_tokens=1).choices


# ---- other endpoints ----


def test_models_health_ping_version(http):
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    card = models["data"][0]
    assert card["object"] == "model" and card["id"] and card["owned_by"] and isinstance(card["created"], int)
    assert card["max_model_len"] == MAX_MODEL_LEN
    assert http.get("/health").status_code == 200 and http.get("/ping").status_code == 200
    version = http.get("/version").json()
    assert version["version"] and version["numerics"].startswith("float32")  # (the default: exact, float32)


def test_tokenize_detokenize_round_trip(http):
    out = post(http, "/tokenize", {"prompt": "Hello, 世界!"})
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == MAX_MODEL_LEN
    assert post(http, "/detokenize", {"tokens": out["tokens"]})["prompt"] == "Hello, 世界!"
    chat = post(http, "/tokenize", {"messages": QUESTION})
    assert "What is the capital of France?" in detokenize(http, chat["tokens"])
    assert post(http, "/detokenize", {"tokens": [10**7]}, 400)["error"]["param"] == "tokens"
    # More ids than the context holds (2.5 million of them took 1.1 s to decode, on the event loop): a 400.
    assert detokenize(http, [42] * MAX_MODEL_LEN) == detokenize(http, [42]) * MAX_MODEL_LEN
    too_many = post(http, "/detokenize", {"tokens": [42] * (MAX_MODEL_LEN + 1)}, 400)["error"]
    assert too_many["param"] == "tokens" and too_many["code"] == "context_length_exceeded"
    body = {"messages": QUESTION, "chat_template_kwargs": {"add_generation_prompt": False}}
    assert post(http, "/tokenize", body, 400)["error"]["param"] == "chat_template_kwargs"


def test_metrics_parse_and_move(http):
    before = metric_samples(http)
    out = post(http, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 3, "temperature": 0})
    after = metric_samples(http)

    def moved(name: str, **labels) -> float:
        return metric(after, f"slipstream:{name}", **labels) - metric(before, f"slipstream:{name}", **labels)

    assert moved("request_success_total", finished_reason="length") == 1
    assert moved("generation_tokens_total") == 3
    assert moved("prompt_tokens_total") == out["usage"]["prompt_tokens"]
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "time_per_output_token_seconds"):
        assert moved(f"{name}_count") == 1 and moved(f"{name}_sum") > 0
    assert moved("prefix_cache_queries_total") > 0
    assert 0 <= metric(after, "slipstream:prefix_cache_hit_rate") <= 1
    assert metric(after, "slipstream:num_requests_running") == 0
    assert metric(after, "slipstream:num_requests_waiting") == 0
    assert 0 <= metric(after, "slipstream:kv_cache_usage_perc") <= 1
    # FastDeploy's names (README: the mapping).
    assert moved("requests_number_total") == 1
    assert moved("prompt_tokens_cached_total") == out["usage"]["prompt_tokens_details"]["cached_tokens"]
    for phase in ("queue", "prefill", "decode"):
        assert moved(f"request_{phase}_time_seconds_count") == 1 and moved(f"request_{phase}_time_seconds_sum") >= 0
    assert moved("request_decode_time_seconds_sum") > 0
    assert 0 <= metric(after, "slipstream:hit_token_rate") <= 1
    assert metric(after, "slipstream:cache_usage_perc") == metric(after, "slipstream:kv_cache_usage_perc")
    assert metric(after, "slipstream:batch_size") == 0  # idle
    with http.stream("POST", "/v1/chat/completions", json={**LONG_REQUEST, "stream": True}) as r:
        data = (line for line in r.iter_lines() if line.startswith("data: "))
        next(data), next(data)  # the role chunk, then the first token's: the engine has stepped
        running = metric_samples(http)
        assert metric(running, "slipstream:batch_size") == metric(running, "slipstream:num_requests_running") == 1
        assert metric(running, "slipstream:cache_usage_perc") > 0
    _wait_for_abort(http, metric(running, "slipstream:request_success_total", finished_reason="abort"))


def _wait_for_abort(http: httpx.Client, aborted_before: float) -> None:
    """Until the abort is counted and nothing runs any more (the abort lands a moment after the disconnect)."""
    deadline = time.monotonic() + 120
    while True:
        samples = metric_samples(http)
        aborted = metric(samples, "slipstream:request_success_total", finished_reason="abort")
        if aborted == aborted_before + 1 and metric(samples, "slipstream:num_requests_running") == 0:
            return
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.2)


LONG_REQUEST = {"messages": QUESTION, "max_tokens": 80, "ignore_eos": True}


def test_client_disconnect_aborts_a_stream(http):
    aborted = metric(metric_samples(http), "slipstream:request_success_total", finished_reason="abort")
    with http.stream("POST", "/v1/chat/completions", json={**LONG_REQUEST, "stream": True}) as r:
        assert next(r.iter_lines()).startswith("data: {")  # the first chunk: it is running
    _wait_for_abort(http, aborted)


def test_client_disconnect_aborts_a_non_stream_request(http):
    """The client hangs up once the engine runs its request (seen in the metrics, not after a fixed time:
    80 tokens can take less than half a second on a fast CPU)."""
    aborted = metric(metric_samples(http), "slipstream:request_success_total", finished_reason="abort")
    body = json.dumps(LONG_REQUEST).encode()
    with socket.create_connection((http.base_url.host, http.base_url.port)) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 60
        while metric(metric_samples(http), "slipstream:num_requests_running") == 0:
            assert time.monotonic() < deadline, "the request never ran"
    _wait_for_abort(http, aborted)


def test_cors_is_off_by_default(http):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    r = http.options("/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-origin" not in http.get("/health", headers={"Origin": "https://app.example"}).headers


def test_a_request_chat_template_runs_in_the_sandbox(http):
    """A template that reaches for Python internals (the way out to files and processes) is a 400."""
    body = {"messages": QUESTION, "max_tokens": 1,
            "chat_template": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}
    error = post(http, "/v1/chat/completions", body, status=400)["error"]
    assert error["param"] == "messages" and "unsafe" in error["message"]
    assert post(http, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 1})["choices"]
    # A template that names a file is that text, never the file's content.
    body = {"messages": QUESTION, "max_tokens": 1, "chat_template": "/etc/passwd", "return_token_ids": True}
    prompt = post(http, "/v1/chat/completions", body)["choices"][0]["message"]["prompt_token_ids"]
    assert detokenize(http, prompt) == "/etc/passwd"
