"""Fuzzing: what the server does with requests nobody wrote by hand.

1. schemathesis, over the server's own /openapi.json, against a real server process (the embedded default
   model): valid and invalid bodies (generation modes positive and negative; the coverage phase's boundary,
   missing and wrong-type values, then Hypothesis' random ones) for every operation the spec lists. No answer
   may be a 5xx (nor a server error inside a 200 stream), none may take REQUEST_TIMEOUT_S or longer, every 4xx
   must be OpenAI's error envelope; afterwards the server still answers a plain chat request, /health is 200
   and its log holds no traceback.
2. What the fuzzing (and a look at what it could not reach: free-form chat templates) found, one request
   each, so that each bug keeps a test of its own whatever the random cases do.
3. Hypothesis property tests of the request models, no server: any JSON object (keys from the model's own
   vocabulary or random) or any byte string given to `parse_body` is either a model or an `APIError` 400
   naming a top-level field (or none), never anything else.

Generation is slow on 2 cores, so each body is made cheap before it is sent (cap_generation_cost: at most
MAX_TOKENS_CAP tokens and N_CAP samples), and everything is derandomized, so CI sends the same cases on every
run. How many cases each operation got is printed after the fuzzing (test_server_survives_fuzzing).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter
from schemathesis.checks import CheckContext, not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance
from server_utils import RunningServer, running_server

from slipstream.entrypoints.openai.errors import APIError
from slipstream.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from slipstream.entrypoints.openai.serving_engine import parse_body
from slipstream.entrypoints.openai.serving_responses import ResponsesRequest

# ---- 1. schemathesis against a real server ----

REQUEST_TIMEOUT_S = 60.0  # a request that takes this long is a hang
MAX_TOKENS_CAP = 4
N_CAP = 2
N_MAX = 128  # SamplingRequest.n's upper bound: a larger n is left as it is, for the server to reject
FUZZ_EXAMPLES = 60  # Hypothesis cases per operation, after the coverage phase's ~1700

# The length fields of each generating operation; the first one is set when a body gives none.
LENGTH_FIELDS = {"/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
                 "/v1/completions": ("max_tokens",),
                 "/v1/responses": ("max_output_tokens",)}

SCHEMATHESIS_CONFIG = {
    "seed": 20240601,
    "generation": {"mode": "all"},  # positive and negative, in every phase
    # Keys with "token" in them (max_tokens, prompt_token_ids) would be masked as secrets in failure reports.
    "output": {"sanitization": {"enabled": False}},
}

# (operation, phase, generation mode) -> cases sent
SENT: Counter[tuple[str, str, str]] = Counter()


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    # --trust-request-chat-template: request templates (code) are part of what is fuzzed; so is n-gram speculation,
    # at any batch size (every request it applies to guesses: limits, n > 1, logprobs, stops and aborts meet it).
    with running_server("--max-model-len", "128", "--enable-logprob", "--trust-request-chat-template",
                        "--speculative-config", '{"method": "ngram", "disable_by_batch_size": 64}') as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(server: RunningServer) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict(SCHEMATHESIS_CONFIG)
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config)


@pytest.fixture(autouse=True)
def _schemathesis_pytest9_shim(request: pytest.FixtureRequest) -> None:
    # schemathesis 4.32.5's lazy schemas rename the test node through `node._nodeid`, which pytest 9's nodes
    # no longer have (it is read before it is written): give it one. Only the subtests' reported names use it.
    request.node._nodeid = request.node.nodeid


_INT = TypeAdapter(int)


def _as_int(value: Any) -> int | None:
    """The int pydantic's lax mode reads from a JSON value (4, 4.0, "4"), else None; bools are left alone."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return _INT.validate_json(json.dumps(value))
    except ValueError:
        return None


def _lowered(value: Any, to: int) -> Any:
    """`to`, in the JSON type `value` came in (so that a string stays a wrong type)."""
    return to if isinstance(value, int) else type(value)(to)


def cap_generation_cost(case: schemathesis.Case) -> None:
    """Make a body cheap to answer without making an invalid body valid or a valid one invalid: only values the
    server would accept are lowered (a huge max_tokens, even as "1000"; an n within its bound), and a body that
    gives no length gets one. Done in the test, not in a map_body hook: hooks skip the coverage phase."""
    fields = LENGTH_FIELDS.get(case.operation.path)
    body = case.body
    if fields is None or not isinstance(body, dict):
        return
    for field in fields:
        if (k := _as_int(body.get(field))) is not None and k > MAX_TOKENS_CAP:
            body[field] = _lowered(body[field], MAX_TOKENS_CAP)
    if all(_as_int(body.get(field)) is None for field in fields) and body.get(fields[0]) is None:
        body[fields[0]] = MAX_TOKENS_CAP  # else the model writes until the context (128 tokens) is full
    if (n := _as_int(body.get("n"))) is not None and N_CAP < n <= N_MAX:
        body["n"] = _lowered(body["n"], N_CAP)


def assert_error_envelope(status: int, content: bytes) -> None:
    """{"error": {"message": str, "type": str, "param": str | None, "code": str | None}}, nothing else."""
    try:
        body = json.loads(content)
    except ValueError:
        raise AssertionError(f"a {status} whose body is not JSON: {content[:500]!r}") from None
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict) and set(body) == {"error"}, f"a {status} not in OpenAI's error envelope: {body!r}"
    assert set(error) == {"message", "type", "param", "code"}, f"a {status} with error keys {sorted(error)}: {body!r}"
    assert isinstance(error["message"], str) and error["message"], f"a {status} without a message: {body!r}"
    assert isinstance(error["type"], str) and error["type"], f"a {status} without a type: {body!r}"
    assert error["param"] is None or isinstance(error["param"], str), f"a {status} with a non-str param: {body!r}"
    assert error["code"] is None or isinstance(error["code"], str), f"a {status} with a non-str code: {body!r}"


def openai_error_envelope(ctx: CheckContext, response: schemathesis.Response, case: schemathesis.Case) -> None:
    if 400 <= response.status_code < 500:
        assert_error_envelope(response.status_code, response.content)


def no_server_error_in_stream(ctx: CheckContext, response: schemathesis.Response,
                              case: schemathesis.Case) -> None:
    """A failure after a stream has started is an error event in a 200: a server-side one is a 5xx in disguise.
    Chat and completions send {"error": {...}}, the Responses API {"type": "error", "code": ...}."""
    if not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        return
    # SSE lines end at CR, LF or CRLF only (str.splitlines would also split at U+2028 inside a JSON string).
    for line in re.split(r"\r\n|\r|\n", response.content.decode(errors="replace")):
        if not line.startswith("data: {"):
            continue
        try:
            event = json.loads(line.removeprefix("data: "))
        except ValueError:
            raise AssertionError(f"an event that is not JSON: {line[:500]!r}") from None
        if isinstance(event.get("error"), dict):
            kind, message = event["error"].get("type"), event["error"].get("message")
        elif event.get("type") == "error":
            kind, message = event.get("code"), event.get("message")
        else:
            continue
        assert kind not in ("server_error", "engine_step_failed") and not str(message).startswith(
            "internal error"), f"a server error inside the stream: {line}"


def _reproducer(case: schemathesis.Case) -> str:
    body = json.dumps(case.body) if isinstance(case.body, dict | list) else repr(case.body)
    return f"{case.operation.label} {body}"


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_fuzz(case: schemathesis.Case) -> None:
    cap_generation_cost(case)
    meta = case.meta
    SENT[(case.operation.label, meta.phase.name.value if meta else "?",
          meta.generation.mode.value if meta else "?")] += 1
    start = time.monotonic()
    try:
        response = case.call(timeout=REQUEST_TIMEOUT_S)
    except requests.Timeout:
        raise AssertionError(f"no answer within {REQUEST_TIMEOUT_S:.0f} s (a hang): {_reproducer(case)}") from None
    elapsed = time.monotonic() - start
    # requests' timeout bounds each read, so a stream that trickles would pass it: bound the whole answer too.
    assert elapsed < REQUEST_TIMEOUT_S, f"the answer took {elapsed:.0f} s: {_reproducer(case)}"
    # Only these checks: the spec documents no 4xx (status_code_conformance would flag every 400), and
    # pydantic's lax mode accepts some of schemathesis' "invalid" values ("4" for 4; negative_data_rejection).
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance,
                                             openai_error_envelope, no_server_error_in_stream])


def _summary() -> str:
    by_operation: dict[str, Counter[str]] = {}
    for (operation, phase, mode), count in SENT.items():
        by_operation.setdefault(operation, Counter())[f"{phase}/{mode}"] += count
    lines = [f"fuzz cases sent: {sum(SENT.values())}"]
    for operation in sorted(by_operation):
        counts = by_operation[operation]
        detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        lines.append(f"  {operation:<36} {sum(counts.values()):>5}  ({detail})")
    return "\n".join(lines)


def test_server_survives_fuzzing(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    """After test_api_fuzz (file order): a plain chat request still works and /health is 200."""
    if SENT:
        with capsys.disabled():
            print(f"\n{_summary()}")
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    model = client.models.list().data[0].id
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello!"}],
                                         max_tokens=8)
    assert out.choices[0].message.content
    assert out.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


# Where a traceback ends: the next log line (uvicorn's "INFO:     ...", logging's "2026-01-01 ...") or traceback.
_LOG_LINE = re.compile(r"^([A-Z]+: |\d{4}-\d\d-\d\d |Traceback)", re.MULTILINE)
_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Exit|Interrupt)\b.*$", re.MULTILINE)


def _tracebacks(log: str) -> list[str]:
    """Each traceback in `log`, from the log line that announced it (which logger, what for)."""
    found = []
    for match in re.finditer(r"^Traceback", log, re.MULTILINE):
        start = match.start()
        window = max(0, start - 2000)
        heads = [m.start() for m in _LOG_LINE.finditer(log, window, start) if m.group(1) != "Traceback"]
        end = _LOG_LINE.search(log, start + 1)
        found.append(log[heads[-1] if heads else start:end.start() if end else len(log)].strip())
    return found


def _describe(tracebacks: list[str]) -> str:
    """One full traceback per distinct final line, with how often it occurred."""
    by_error: dict[str, list[str]] = {}
    for tb in tracebacks:
        lines = [m.group(0) for m in _EXCEPTION_LINE.finditer(tb)]
        by_error.setdefault(lines[-1] if lines else tb.splitlines()[-1], []).append(tb)
    return "\n\n".join(f"{len(tbs)}x {error}:\n{tbs[0]}" for error, tbs in by_error.items())


def test_server_log_has_no_traceback(server: RunningServer) -> None:
    """A caught error still means a bug if it left a traceback (errors.py logs only the unexpected ones)."""
    tracebacks = _tracebacks(server.log())
    assert not tracebacks, f"the server logged {len(tracebacks)} tracebacks:\n{_describe(tracebacks)}"


# ---- 2. what the fuzzing found, one request each ----

HI = [{"role": "user", "content": "Hi"}]

# (path, body): each must be a 4xx in the error envelope, leaving no traceback in the log. Each was a 500.
FINDINGS = {
    # A token id beyond what the tokenizer's C int holds reached tokenizer.decode (serving_completion._prompts)
    # before the engine's range check: OverflowError.
    "completions-prompt-negative-id": ("/v1/completions", {"prompt": [-1], "max_tokens": 1}),
    "completions-prompt-huge-id": ("/v1/completions", {"prompt": [[4294967296]], "max_tokens": 1}),
    "completions-prompt-token-ids-huge-id": ("/v1/completions", {"prompt_token_ids": [4294967296],
                                                                 "max_tokens": 1}),
    # A chat template that fails with anything but a TemplateError, ValueError or TypeError.
    "chat-template-zero-division": ("/v1/chat/completions", {"messages": HI, "chat_template": "{{ 1/0 }}",
                                                             "max_tokens": 1}),
    "chat-template-sandbox-range": ("/v1/chat/completions", {"messages": HI, "max_tokens": 1,
                                                             "chat_template": "{{ range(100001)|list }}"}),
    # chat_template_kwargs naming `messages`, which render_chat_text also takes: a TypeError at the call.
    "chat-template-kwargs-messages": ("/v1/chat/completions", {"messages": HI, "max_tokens": 1,
                                                               "chat_template_kwargs": {"messages": 1}}),
    "responses-template-kwargs-messages": ("/v1/responses", {"input": "Hi", "max_output_tokens": 1,
                                                             "chat_template_kwargs": {"messages": 1}}),
    "tokenize-template-kwargs-messages": ("/tokenize", {"messages": HI, "chat_template_kwargs": {"messages": 1}}),
    # An assistant's earlier tool_calls reached the template code unchecked (a helper session's probe): TypeError,
    # KeyError or AttributeError, with tools (generic format) or without.
    **{f"chat-tool-calls-{name}": ("/v1/chat/completions", {
        "messages": [*HI, {"role": "assistant", "tool_calls": calls}], "max_tokens": 1,
        **({"tools": [{"type": "function", "function": {"name": "get_w"}}]} if tools else {})})
       for name, calls, tools in (("string", "x", True), ("string-no-tools", "x", False),
                                  ("list-of-strings", ["x"], True), ("no-function", [{"id": "c1"}], True),
                                  ("null-function", [{"function": None}], True),
                                  ("no-name", [{"id": "1", "function": {"arguments": "{}"}}], True),
                                  ("number", 5, False), ("object", {"a": 1}, True))},
    "chat-tool-calls-on-a-user-message": ("/v1/chat/completions", {"max_tokens": 1, "messages": [
        {"role": "user", "content": "Hi", "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "{}"}}]}]}),
}


@pytest.mark.parametrize(("path", "body"), list(FINDINGS.values()), ids=list(FINDINGS))
def test_fuzz_finding(server: RunningServer, path: str, body: dict[str, Any]) -> None:
    logged = len(server.log())
    response = httpx.post(f"{server.url}{path}", json=body, timeout=REQUEST_TIMEOUT_S)
    time.sleep(0.3)  # let the log catch up
    tracebacks = _tracebacks(server.log()[logged:])
    in_log = f"\nthe server logged:\n{_describe(tracebacks)}" if tracebacks else ""
    assert 400 <= response.status_code < 500, f"{response.status_code} {response.text}{in_log}"
    assert_error_envelope(response.status_code, response.content)
    assert not tracebacks, f"the request left tracebacks in the log:{in_log}"


def test_sampling_settings_json_cannot_mean_are_400(server: RunningServer) -> None:
    """JSON's Infinity and NaN (Python's json writes them) are no temperature or penalty: a 400 naming the field.
    Infinity once reached the sampler, whose NaN row then failed every request batched with it."""
    for field in ("temperature", "top_p", "repetition_penalty", "presence_penalty"):
        for value in ("Infinity", "NaN"):
            content = f'{{"prompt": "Hi", "max_tokens": 1, "{field}": {value}}}'
            response = httpx.post(f"{server.url}/v1/completions", content=content, timeout=REQUEST_TIMEOUT_S,
                                  headers={"Content-Type": "application/json"})
            assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text
            assert_error_envelope(response.status_code, response.content)


def test_settings_that_leave_no_token_to_draw_fail_nobody(server: RunningServer) -> None:
    """Valid settings under which a row has no finite logit (every token banned; a repetition_penalty float32 rounds
    to 0, dividing by it; a temperature float32 rounds to inf): the row's draw ran past the vocabulary and the next
    step's embedding lookup failed every request in the batch, a stranger's stream among them. Now each such row is
    drawn from the model's own logits, or its +inf logits' tokens, and every request in the batch ends normally."""
    vocab = 49152
    hostile = [{"temperature": 1e39}, {"temperature": 1.0, "repetition_penalty": 1e-300},
               {"temperature": 1.0, "bad_words_token_ids": list(range(vocab))},
               {"temperature": 0, "bad_words_token_ids": list(range(vocab))},
               {"temperature": 1.0, "repetition_penalty": 1e-300, "logprobs": 2}]
    stranger: dict[str, Any] = {}

    def stream() -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=REQUEST_TIMEOUT_S, json={
                "prompt": "Once upon a time", "max_tokens": MAX_TOKENS_CAP, "ignore_eos": True, "stream": True,
                "return_token_ids": True}) as r:
            stranger["events"] = [json.loads(line[6:]) for line in r.iter_lines()
                                  if line.startswith("data: {")]

    worker = threading.Thread(target=stream)
    worker.start()
    for settings_ in hostile:
        body = {"prompt": "Once upon a time", "max_tokens": 3, "ignore_eos": True, "return_token_ids": True,
                **settings_}
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == 200, (settings_.keys(), response.text[:300])
        ids = response.json()["choices"][0]["completion_token_ids"]
        assert len(ids) == 3 and all(0 <= t < vocab for t in ids), (settings_.keys(), ids)
    worker.join()
    events = stranger["events"]
    assert events and not any("error" in e for e in events), events[-1]
    assert sum(len(e["choices"][0].get("completion_token_ids") or []) for e in events) == MAX_TOKENS_CAP


def test_a_prompt_too_long_to_fit_in_any_tokenization_is_400_before_tokenizing(server: RunningServer) -> None:
    """A prompt of megabytes (15.6 MB under the default body limit) held the prompt worker for the 25 s of its
    tokenization, and every other request's prompt behind it, only to be rejected: now its length in characters
    rules it out first (the message counts characters, not tokens: it was not tokenized)."""
    for path, body in (("/v1/completions", {"prompt": "a b " * 200_000, "max_tokens": 1}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a b " * 200_000}],
                                                 "max_tokens": 1}),
                       ("/tokenize", {"prompt": "a b " * 200_000})):
        response = httpx.post(f"{server.url}{path}", json=body, timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == 400, response.text[:300]
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded" and "characters" in error["message"], error


def test_a_dashboard_limit_of_unicode_digits_is_400_without_traceback(server: RunningServer) -> None:
    logged = len(server.log())
    response = httpx.get(f"{server.url}/v1/engine/requests", params={"limit": "\u00b2"}, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 400 and response.json()["error"]["param"] == "limit", response.text
    time.sleep(0.3)
    assert not _tracebacks(server.log()[logged:])


# Invalid structured-output specs, one per form; {} makes each one new (a compiled spec is cached).
INVALID_GRAMMARS = {
    "regex": ("/v1/chat/completions", {"messages": HI, "max_tokens": 1, "guided_regex": "({}"}),
    "json-schema": ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "guided_json": {"type": "x{}"}}),
    "ebnf": ("/v1/chat/completions", {"messages": HI, "max_tokens": 1, "guided_grammar": "root ::= {} ("}),
    "responses-text-format": ("/v1/responses", {"input": "Hi", "max_output_tokens": 1, "text": {"format": {
        "type": "json_schema", "name": "x", "schema": {"type": "x{}"}}}}),
}


@pytest.mark.parametrize(("path", "body"), list(INVALID_GRAMMARS.values()), ids=list(INVALID_GRAMMARS))
def test_invalid_grammar_leaves_no_traceback(server: RunningServer, path: str, body: dict[str, Any]) -> None:
    """An invalid grammar is a 400 and nothing else: the asyncio wrapper of its compile future
    (serving_engine._check_grammar) once left "ERROR asyncio: Future exception was never retrieved" and a
    traceback for nearly every such request (not when the engine thread ended it first, hence three)."""
    logged = len(server.log())
    for i in range(3):
        unique = json.loads(json.dumps(body).replace("{}", f"{i}{time.monotonic_ns()}"))
        response = httpx.post(f"{server.url}{path}", json=unique, timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == 400, (response.status_code, response.text)
        assert_error_envelope(response.status_code, response.content)
    time.sleep(0.3)
    tracebacks = _tracebacks(server.log()[logged:])
    assert not tracebacks, f"invalid grammars left tracebacks in the log:\n{_describe(tracebacks)}"


def test_rendering_a_prompt_does_not_stall_the_server(server: RunningServer) -> None:
    """A 90-byte body whose chat template renders a huge prompt once tied up the event loop while it was
    rendered and tokenized: every other request, /health included, waited (~10 s at 'a' * 10**7; at 10**9
    the server died for memory, which is why request templates need --trust-request-chat-template). Now
    prompts are built off the loop: the answer is a 400 (context length) and /health answers meanwhile."""
    body = {"messages": HI, "max_tokens": 1, "chat_template": "{{ 'a' * 3000000 }}"}
    answer: dict[str, httpx.Response] = {}
    worker = threading.Thread(target=lambda: answer.update(r=httpx.post(
        f"{server.url}/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)))
    worker.start()
    time.sleep(0.3)  # let it start rendering
    start = time.monotonic()
    health = httpx.get(f"{server.url}/health", timeout=REQUEST_TIMEOUT_S)
    waited = time.monotonic() - start
    worker.join()
    assert health.status_code == 200
    assert 400 <= answer["r"].status_code < 500, (answer["r"].status_code, answer["r"].text)
    assert waited < 1.0, f"/health waited {waited:.1f} s for another request's chat template"


# ---- 3. the request models, without a server ----

MODELS: list[type[BaseModel]] = [ChatCompletionRequest, CompletionRequest, ResponsesRequest]
MINIMAL_BODIES: dict[type[BaseModel], dict[str, Any]] = {
    ChatCompletionRequest: {"messages": HI},
    CompletionRequest: {"prompt": "Hi"},
    ResponsesRequest: {"input": "Hi"},
}


def _schema_vocabulary(model: type[BaseModel]) -> tuple[list[str], list[Any]]:
    """Every property name and enum/const value in the model's JSON schema, its nested models' included,
    so that generated objects reach past the top level (a message's "role", a tool's "type": "function")."""
    keys: set[str] = set()
    values: list[Any] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            keys.update(node.get("properties", {}))
            values.extend(node.get("enum", []))
            if "const" in node:
                values.append(node["const"])
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(model.model_json_schema())
    return sorted(keys), [v for v in values if isinstance(v, str | int | float | bool)]


def _top_level_names(model: type[BaseModel]) -> set[str]:
    names = set(model.model_fields)
    names.update(f.alias for f in model.model_fields.values() if f.alias)
    return names


def json_objects(model: type[BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with keys from the model's vocabulary or random, values any JSON (the schema's constants too)."""
    keys, constants = _schema_vocabulary(model)
    key = st.sampled_from(keys) | st.text(max_size=12)
    scalar = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
              | st.text(max_size=20) | st.sampled_from(constants or [None]))
    value = st.recursive(scalar, lambda children: st.lists(children, max_size=4)
                         | st.dictionaries(key, children, max_size=5), max_leaves=24)
    objects = st.dictionaries(key, value, max_size=8)
    # Half of them over a minimal valid body, so that they get past "messages is required" to the other rules.
    return objects | objects.map(lambda obj: {**MINIMAL_BODIES[model], **obj})


JSON_OBJECTS = {model: json_objects(model) for model in MODELS}  # built once: building one takes a while


def check_parse(model: type[BaseModel], body: bytes) -> BaseModel | APIError:
    """parse_body's contract: a model, or an APIError 400 with a message and param None or a top-level field.
    Anything else it raises propagates: a bug (the server would answer it with a 500)."""
    try:
        return parse_body(model, body)
    except APIError as err:
        assert err.status == 400, (err.status, err.message)
        assert isinstance(err.message, str) and err.message
        assert err.param is None or err.param in _top_level_names(model), (err.param, err.message)
        return err


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_parse_body_json_objects(model: type[BaseModel], data: st.DataObject) -> None:
    check_parse(model, json.dumps(data.draw(JSON_OBJECTS[model])).encode())


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_parse_body_deep_nesting(model: type[BaseModel]) -> None:
    """Nesting deeper than the JSON parser's recursion limit is a 400, not a RecursionError."""
    for depth in (100, 1000, 20_000):
        for field in sorted(_top_level_names(model)):
            check_parse(model, b'{"%s": ' % field.encode() + b"[" * depth + b"]" * depth + b"}")
            check_parse(model, b'{"%s": ' % field.encode() + b'{"a": ' * depth + b"1" + b"}" * (depth + 1))


def _not_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except ValueError:
        return True
    return False


# Almost JSON: a plausible body cut short anywhere.
truncated_json = st.builds(lambda text, cut: text.encode()[:cut], st.text(max_size=60).map(
    lambda t: json.dumps({"messages": [{"role": "user", "content": t}], "prompt": t, "input": t})),
    st.integers(0, 150))


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(raw=st.binary(max_size=200) | truncated_json)
@example(raw=b'{"messages": NaN}')
@example(raw=b"\xff\xfe{}")
@example(raw=b"")
def test_parse_body_not_json(model: type[BaseModel], raw: bytes) -> None:
    assume(_not_json(raw))
    result = check_parse(model, raw)
    assert isinstance(result, APIError), f"{raw!r} parsed as {result!r}"
    assert result.param is None, result.message
