"""Faults and shutdown on a real server process.

An engine step that raises (the scripted model's fault hook: a batch holding the word FAULT) fails the
requests of that step with an error, and the server goes on serving. SIGTERM drains: new requests and
/health get 503, requests in flight finish within --shutdown-timeout, the rest end with an error event,
and the process exits 0.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from scripted_model import EOS, FAULT, save_scripted_model
from scripted_server import running_scripted_server
from server_utils import running_server

ANSWER = "Hi there, how are you?"
QUESTION = [{"role": "user", "content": "hi"}]
FAULTY = [{"role": "user", "content": f"hi {FAULT}"}]


def metrics(url: str) -> dict[tuple, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict[tuple, float], name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def sse_events(lines) -> list:
    """The `data:` payloads of SSE lines, JSON-decoded except the final [DONE]."""
    return [line.removeprefix("data: ") if line == "data: [DONE]" else json.loads(line.removeprefix("data: "))
            for line in lines if line.startswith("data: ")]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    model = save_scripted_model(tmp_path_factory.mktemp("scripted"), [f"assistant\n<think>\n{ANSWER}{EOS}"],
                                texts=["user\nhi"])
    with running_scripted_server("--model", str(model), "--kv-cache-memory", "16MiB") as server:
        yield server


def test_a_failing_step_fails_its_requests_and_the_server_goes_on(scripted):
    client = openai.OpenAI(base_url=scripted.base_url, api_key="unused", max_retries=0, timeout=60)
    assert client.chat.completions.create(model="m", messages=QUESTION).choices[0].message.content == ANSWER
    errors_before = metric(metrics(scripted.url), "slipstream:request_success_total", finished_reason="error")

    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="m", messages=FAULTY)
    assert e.value.status_code == 500 and e.value.body["code"] == "engine_step_failed"
    assert "injected fault" in e.value.body["message"]

    body = {"model": "m", "messages": FAULTY, "stream": True}
    with httpx.stream("POST", f"{scripted.base_url}/chat/completions", json=body, timeout=60) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_step_failed"

    # The engine lives on: health, a normal answer, the failures counted and every KV block back.
    assert httpx.get(f"{scripted.url}/health", timeout=30).status_code == 200
    assert client.chat.completions.create(model="m", messages=QUESTION).choices[0].message.content == ANSWER
    samples = metrics(scripted.url)
    assert metric(samples, "slipstream:request_success_total", finished_reason="error") == errors_before + 2
    assert metric(samples, "slipstream:num_requests_running") == 0
    assert metric(samples, "slipstream:kv_cache_usage_perc") == 0
    assert "an engine step failed" in scripted.log()


# ---- SIGTERM ----

SHUTDOWN_TIMEOUT_S = 8


def _stream_in_thread(url: str, body: dict, started: threading.Event, result: dict) -> threading.Thread:
    def run() -> None:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=300) as r:
            lines = r.iter_lines()
            result["first"] = next(lines)
            started.set()
            result["events"] = sse_events(lines)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_sigterm_drains_then_exits_0():
    with running_server("--max-model-len", "4096", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)) as server:
        short_started, long_started = threading.Event(), threading.Event()
        short, long = {}, {}
        threads = [
            _stream_in_thread(server.url, {"messages": QUESTION, "max_tokens": 12, "ignore_eos": True},
                              short_started, short),
            _stream_in_thread(server.url, {"messages": QUESTION, "max_tokens": 3500, "ignore_eos": True},
                              long_started, long),
        ]
        assert short_started.wait(120) and long_started.wait(120)
        viewer: list = []  # the dashboard's endless stream: it held the exit up 5 s, then was cut off mid-frame
        watching = threading.Thread(target=lambda: viewer.append(_dashboard_frames(server.url)), daemon=True)
        watching.start()
        time.sleep(1)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # Draining: the port still answers, but nothing new starts and load balancers see 503.
        r = httpx.post(f"{server.base_url}/chat/completions", json={"messages": QUESTION, "max_tokens": 1}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 503
        for thread in threads:
            thread.join(SHUTDOWN_TIMEOUT_S + 60)
        # The short request finished normally; the long one was ended at the timeout with an error event.
        assert short["events"][-1] == "[DONE]" and short["events"][-2]["choices"][0]["finish_reason"] == "length"
        assert long["events"][-1] == "[DONE]" and "shutting down" in long["events"][-2]["error"]["message"]
        assert server.process.wait(timeout=60) == 0, server.log()
        watching.join(60)
        frames = viewer[0]
        assert frames[-1]["stats"]["health"]["status"] == "draining", frames[-1]  # (then it ended, cleanly)
        assert "Traceback" not in server.log() and "graceful shutdown exceeded" not in server.log()


def _dashboard_frames(url: str) -> list[dict]:
    """The frames of /v1/engine/stream until it ends (an error if it is cut off instead)."""
    with httpx.stream("GET", f"{url}/v1/engine/stream", timeout=120) as r:
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
