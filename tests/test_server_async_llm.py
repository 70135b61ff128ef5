"""AsyncLLM (the engine thread behind the server) and the app's failure paths, in-process over the real
default-model engine of `llm_fp32`: loading (503), groups of requests, early close = abort, refused
requests, and an engine whose step raises (every waiter fails, /health 503, a started stream ends with
an error event and [DONE]). The step failure is injected: no real fault is that cheap to provoke."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from slipstream import SamplingParams
from slipstream.engine.async_llm import AsyncLLM, EngineDeadError
from slipstream.engine.llm_engine import ContextLengthError
from slipstream.entrypoints.openai.args import parse_args
from slipstream.entrypoints.openai.metrics import Metrics
from slipstream.entrypoints.openai.server import build_app

GREEDY = SamplingParams(temperature=0, max_tokens=3)


@pytest.fixture
def engine(llm_fp32):
    engine = llm_fp32.engine
    yield engine
    for rid in list(engine.seqs):  # whatever a failed test left in the shared engine
        engine.abort_request(rid)


def run(coro_fn, engine, **kwargs):
    """Run `coro_fn(llm)` against a started AsyncLLM over `engine`, then shut the AsyncLLM down."""

    async def main():
        llm = AsyncLLM(lambda: engine, **kwargs)
        llm.start()
        try:
            await llm.wait_ready()
            return await coro_fn(llm)
        finally:
            llm.shutdown()

    return asyncio.run(main())


def prompt(engine, text: str) -> list[int]:
    return engine.tokenizer.encode(text)


def test_a_group_streams_every_request_to_its_end(engine):
    async def go(llm):
        requests = [(f"r{i}", prompt(engine, "The capital of France is"), GREEDY) for i in range(2)]
        outs = [o async for o in await llm.generate(requests)]
        return outs, llm.stats()

    outs, stats = run(go, engine)
    by_id = {rid: [o for o in outs if o.request_id == rid] for rid in ("r0", "r1")}
    for chunks in by_id.values():
        assert sum(len(o.token_ids) for o in chunks) == 3
        assert [o.finished for o in chunks] == [False, False, True]
    assert "".join(o.text for o in by_id["r0"]) == "".join(o.text for o in by_id["r1"])  # greedy twins
    assert stats["num_running"] == 0 and not engine.has_unfinished()


def test_closing_a_stream_early_aborts_the_rest(engine):
    seen = []

    async def go(llm):
        long = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
        stream = await llm.generate([("long", prompt(engine, "Once upon a time"), long)])
        seen.append(await anext(stream))
        await stream.aclose()
        # Commands run in order: once this next request is through, the abort was done before it.
        return [o async for o in await llm.generate([("next", prompt(engine, "Hi"), GREEDY)])]

    outs = run(go, engine, on_output=seen.append)
    assert outs[-1].finished and not engine.has_unfinished()
    assert [o.finish_reason for o in seen if o.request_id == "long" and o.finished] == ["abort"]


def test_a_requests_first_token_time_counts_its_wait_for_the_step_in_progress(engine):
    """A request that arrives while the engine thread runs another's long prompt waits for that step before it is
    scheduled: its TTFT (the outputs' arrival_times, what /metrics and the streamed chunks report) counts that wait,
    as its client sees it, not only from when the engine thread took it."""

    async def go(llm):
        busy = await llm.generate([("long", [1000] * 1500, GREEDY)])  # steps of hundreds of ms on a CPU
        first = asyncio.create_task(anext(busy))
        await asyncio.sleep(0.05)  # (its first step under way)
        sent = time.monotonic()
        out = await anext(await llm.generate([("short", prompt(engine, "Hi"), GREEDY)]))
        seen = time.monotonic() - sent
        await first
        async for _ in busy:
            pass
        return out, seen

    out, seen = run(go, engine)
    assert out.arrival_times[0] <= seen
    assert out.arrival_times[0] >= seen - 0.05, (out.arrival_times[0], seen)


def test_a_refused_request_raises_before_any_output_and_leaves_nothing(engine):
    async def go(llm):
        ok = ("ok", prompt(engine, "Hello"), GREEDY)
        too_long = ("long", [1] * (engine.max_model_len + 1), GREEDY)
        with pytest.raises(ContextLengthError):
            await llm.generate([ok, too_long])
        with pytest.raises(ValueError, match="empty"):
            await llm.generate([("empty", [], GREEDY)])

    run(go, engine)
    assert not engine.has_unfinished()


def test_an_engine_that_fails_fails_its_requests_and_refuses_more(engine, monkeypatch):
    def broken_step():
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "step", broken_step)

    async def go(llm):
        stream = await llm.generate([("a", prompt(engine, "Hello"), GREEDY)])  # the add itself works
        with pytest.raises(EngineDeadError, match="device lost"):
            async for _ in stream:
                pass
        assert "device lost" in str(llm.error)
        with pytest.raises(EngineDeadError):
            await llm.generate([("b", prompt(engine, "Hello"), GREEDY)])

    run(go, engine)


def test_a_model_that_fails_to_load_reports_why():
    async def go():
        def make_engine():
            raise ValueError("no such model")

        llm = AsyncLLM(make_engine)
        llm.start()
        with pytest.raises(EngineDeadError, match="failed to load the model: no such model"):
            await llm.wait_ready()
        assert llm.error is not None
        llm.shutdown()

    asyncio.run(go())


# ---- the app in-process (httpx's ASGI transport) ----


def app_client(llm: AsyncLLM) -> httpx.AsyncClient:
    args = parse_args(["--enable-logprob"])
    app = build_app(args, llm, Metrics("test", llm.stats))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=600)


def test_health_is_503_while_the_model_loads(engine):
    loaded = threading.Event()

    def slow_load():
        loaded.wait()
        return engine

    async def go():
        llm = AsyncLLM(slow_load)
        llm.start()
        async with app_client(llm) as http:
            r = await http.get("/health")
            assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
            r = await http.post("/v1/completions", json={"prompt": "Hi"})
            assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error"
            loaded.set()
            await llm.wait_ready()
            assert (await http.get("/health")).status_code == 200
            assert (await http.get("/v1/models")).json()["data"][0]["max_model_len"] == engine.max_model_len
        llm.shutdown()

    asyncio.run(go())


def test_a_stream_whose_engine_dies_ends_with_an_error_event_then_done(engine, monkeypatch):
    real_step = engine.step
    steps = []

    def failing_second_step():
        steps.append(1)
        if len(steps) == 2:
            raise RuntimeError("device lost")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_second_step)

    async def go(llm):
        async with app_client(llm) as http:
            r = await http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 5,
                                                         "stream": True})
            assert r.status_code == 200  # the stream had started when the engine died
            events = [line.removeprefix("data: ") for line in r.text.splitlines() if line]
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert "device lost" in error["message"] and error["type"] == "service_unavailable_error"
            assert any("choices" in json.loads(e) for e in events[:-2])  # a token came before the failure
            r = await http.get("/health")
            assert r.status_code == 503 and "device lost" in r.json()["error"]["message"]
            r = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code == 503

    run(go, engine)
