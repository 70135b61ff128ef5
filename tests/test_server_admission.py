"""Who gets in, on a real server process started with API keys, a served model name, one concurrent
request at most, no --enable-logprob and the seed's --max-model-len 32768 (beyond the default model's 8192)."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_utils import free_port, running_server
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from slipstream.entrypoints.openai.admission import GenerationGate, GenerationGateMiddleware

KEYS = ("key-one", "key-two")
NAME = "smol"
ALIAS = "org/smol-instruct"  # a second --served-model-name, with a slash as hub ids have
ALLOWED_ORIGIN = "https://app.example"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def server():
    with running_server("--api-key", KEYS[0], "--api-key", KEYS[1], "--served-model-name", NAME, ALIAS,
                        "--trust-remote-code", "--enforce-eager", "--max-concurrency", "1", "--max-model-len", "32K",
                        "--engine-worker-queue-port", "8182",
                        "--allowed-origins", ALLOWED_ORIGIN,
                        "--cpu-threads", "1", "--metrics-port", str(METRICS_PORT)) as s:
        yield s


def client(server, key: str = KEYS[0]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=600)


def test_start_up_reports_what_it_loaded_and_caps_the_context(server):
    log = server.log()
    assert "KV blocks" in log and "MiB, float32), max model len" in log and "(1 threads)" in log
    assert f"serving {NAME} at http://127.0.0.1:" in log
    assert "exceeds the model's trained context 8192" in log
    card = client(server).models.list().data[0]
    assert card.id == NAME and card.model_extra["max_model_len"] <= 8192


def test_every_key_works_and_others_get_401(server):
    for key in KEYS:
        assert client(server, key).chat.completions.create(model=NAME, messages=QUESTION, max_tokens=1).choices
    with pytest.raises(openai.AuthenticationError) as e:
        client(server, "wrong").chat.completions.create(model=NAME, messages=QUESTION, max_tokens=1)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(f"{server.base_url}/completions", json={"prompt": "Hi", "max_tokens": 1})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.base_url}/models").status_code == 401


def test_metrics_also_on_their_own_port(server):
    client(server).completions.create(model=NAME, prompt="Hi", max_tokens=1)

    def requests_number(url: str) -> float:
        text = httpx.get(url, timeout=30).text
        return next(s.value for family in text_string_to_metric_families(text) for s in family.samples
                    if s.name == "slipstream:requests_number_total")

    own = requests_number(f"http://127.0.0.1:{METRICS_PORT}/metrics")
    assert own >= 1 and own == requests_number(f"{server.url}/metrics")


def test_health_and_metrics_need_no_key(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_cors_only_for_allowed_origins(server):
    """A browser's preflight needs no key and is answered for the allowed origin alone."""
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    ok = httpx.options(f"{server.base_url}/chat/completions", headers={"Origin": ALLOWED_ORIGIN, **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    other = httpx.options(f"{server.base_url}/chat/completions", headers={"Origin": "https://evil.example",
                                                                          **preflight})
    assert "access-control-allow-origin" not in other.headers
    r = httpx.get(f"{server.url}/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_a_request_chat_template_needs_trust_request_chat_template(server):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model=NAME, messages=QUESTION, max_tokens=1,
                                               extra_body={"chat_template": "{{ 'a' * 10**9 }}"})
    assert e.value.body["param"] == "chat_template" and "--trust-request-chat-template" in e.value.body["message"]


def test_an_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as e:
        client(server).chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=1)
    assert e.value.body["code"] == "model_not_found" and "gpt-4o" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client(server).completions.create(model="null", prompt="Hi", max_tokens=1)


def test_vllm_command_lines_start_and_every_served_name_is_served(server):
    """vLLM's --trust-remote-code / --enforce-eager stopped the start ("unrecognized arguments") and a second
    --served-model-name too: they are accepted, the log says the flags act on nothing here, and every name is
    listed and taken, the first one answering."""
    assert ("--trust-remote-code, --enforce-eager, --engine-worker-queue-port / --cache-queue-port: accepted for "
            "vLLM's and FastDeploy's command lines") in server.log()
    assert [m.id for m in client(server).models.list().data] == [NAME, ALIAS]
    assert client(server).models.retrieve(ALIAS).id == ALIAS
    answer = client(server).completions.create(model=ALIAS, prompt="Hi", max_tokens=1)
    assert answer.model == NAME


def test_models_retrieve(server):
    """GET /v1/models/{id} (the SDK's models.retrieve, a common start-up check in client code) was a 404."""
    card = client(server).models.retrieve(NAME)
    assert card.id == NAME and card.model_extra["max_model_len"] <= 8192
    with pytest.raises(openai.NotFoundError) as e:
        client(server).models.retrieve("gpt-4o")
    assert e.value.body["code"] == "model_not_found"
    assert httpx.get(f"{server.base_url}/models/{NAME}").status_code == 401  # (behind the key, as /v1/models is)


def test_logprobs_need_enable_logprob(server):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model=NAME, messages=QUESTION, max_tokens=1, logprobs=True)
    assert "--enable-logprob" in e.value.body["message"] and e.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model=NAME, messages=QUESTION, max_tokens=1, logprobs=True,
                                               top_logprobs=2)
    assert "--enable-logprob" in e.value.body["message"] and e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client(server).completions.create(model=NAME, prompt="Hi", max_tokens=1, logprobs=0)
    assert "--enable-logprob" in e.value.body["message"] and e.value.body["param"] == "logprobs"


def test_a_request_over_max_concurrency_is_429(server):
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=600) as http:
        # long enough to hold the slot through the checks below on any CPU (it is abandoned, not read to its end)
        long = {"model": NAME, "messages": QUESTION, "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/chat/completions", json=long) as r:
            lines = r.iter_lines()  # (a dropped iterator would close the response)
            assert next(lines).startswith("data: {")  # it holds the only slot now
            with pytest.raises(openai.RateLimitError) as e:
                client(server).chat.completions.create(model=NAME, messages=QUESTION, max_tokens=1)
            assert e.value.body["code"] == "rate_limit_exceeded" and "--max-concurrency 1" in e.value.body["message"]
            assert e.value.response.headers["retry-after"] == "1"  # the openai SDK's retries wait this long
            assert http.get("/models").status_code == 200  # only generation counts
        # The slot comes back once the server has seen the disconnect.
        deadline = time.monotonic() + 120
        short = {"model": NAME, "prompt": "Hi", "max_tokens": 1}
        while (r := http.post("/completions", json=short)).status_code == 429:
            assert time.monotonic() < deadline, "the slot never came back"
            time.sleep(0.1)
        assert r.status_code == 200


def test_a_client_slow_to_send_its_body_holds_no_slot(server):
    """The only slot was taken before the body was read: a client that sent headers and one byte of its body, then
    waited, locked everyone else out (429s) for as long as its socket stayed open."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as slow:
        slow.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[0]}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode())
        time.sleep(0.5)  # (the server has its headers and a byte)
        answer = client(server).completions.create(model=NAME, prompt="Hi", max_tokens=1)
        assert answer.choices[0].text is not None


def test_the_bearer_scheme_in_any_case_and_no_model_named(server):
    """RFC 7235's schemes are case-insensitive (`bearer` was a 401); a request naming no model gets the one served,
    as vLLM's do (it was a 404 for `None`), while a wrong name stays a 404 (test_an_unknown_model_is_404)."""
    for scheme in ("bearer", "BEARER"):
        r = httpx.post(f"{server.base_url}/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=600,
                       headers={"Authorization": f"{scheme} {KEYS[1]}"})
        assert r.status_code == 200 and r.json()["model"] == NAME, r.text
    r = httpx.get(f"{server.base_url}/models", headers={"Authorization": f"Basic {KEYS[0]}"})
    assert r.status_code == 401


# ---- --max-waiting-time, in-process: the middleware over an endpoint that holds its slot until told ----


def limited_app(max_wait: float) -> tuple[Starlette, asyncio.Event]:
    release = asyncio.Event()

    async def hold(request):
        await release.wait()
        return PlainTextResponse("done")

    app = Starlette(routes=[Route("/v1/completions", hold, methods=["POST"])])
    gate = GenerationGate(limit=1, max_wait=max_wait)
    return GenerationGateMiddleware(app, gate, paths=("/v1/completions",), send_timeout=600), release


@pytest.mark.parametrize(("max_wait", "second_status"), [(0, 429), (0.05, 429), (-1, 200), (600, 200)])
def test_max_waiting_time(max_wait, second_status):
    async def go():
        app, release = limited_app(max_wait)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            first = asyncio.create_task(http.post("/v1/completions"))
            while not app.gate.slots.locked():
                await asyncio.sleep(0.01)
            second = asyncio.create_task(http.post("/v1/completions"))
            if second_status == 429:
                assert (await second).status_code == 429
                release.set()
            else:
                await asyncio.sleep(0.1)  # the second one waits meanwhile
                assert not second.done()
                release.set()
                assert (await second).status_code == 200
            assert (await first).status_code == 200

    asyncio.run(go())
