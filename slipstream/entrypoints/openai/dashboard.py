"""The serving observatory: `GET /dashboard` (one page packaged with slipstream, nothing fetched from elsewhere)
and the JSON behind it, which scripts can read too:

- `GET /v1/engine/stats`: health, requests running / waiting, KV blocks, prefix cache, tokens/s, latency
  percentiles over the last minute, per-second batch composition (engine/recorder.py);
- `GET /v1/engine/requests?limit=N`: the newest requests' timelines (queued, prefill chunks, decode, finish);
- `GET /v1/engine/stream`: server-sent events, both of the above STREAM_HZ times a second. One producer builds
  each event once and every viewer gets the same bytes, so ten open tabs cost what one does.

Under /v1/ the API key guards the data; the page itself holds none. Prompt text is shown only with
--dashboard-show-prompts.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, StreamingResponse

from slipstream.engine.async_llm import AsyncLLM
from slipstream.engine.recorder import RequestTrace
from slipstream.entrypoints.openai.admission import GenerationGate
from slipstream.entrypoints.openai.errors import APIError
from slipstream.entrypoints.openai.metrics import Metrics

STREAM_HZ = 2.0
STREAM_REQUESTS = 40  # timelines in each stream event
MAX_LIMIT = 200
_VIEWER_BACKLOG = 2  # events a slow viewer may fall behind before it skips some
_PROMPT_CACHE = 256


class Dashboard:
    def __init__(self, llm: AsyncLLM, metrics: Metrics, gate: GenerationGate, model_name: str,
                 show_prompts: bool) -> None:
        self.llm = llm
        self.metrics = metrics
        self.gate = gate
        self.model_name = model_name
        self.show_prompts = show_prompts
        self._viewers: set[asyncio.Queue[str]] = set()
        self._producer: asyncio.Task | None = None
        self._prompts: OrderedDict[str, str] = OrderedDict()  # request id -> decoded prompt

    def _engine(self):
        return None if self.llm.error is not None else self.llm.engine

    def health(self) -> dict[str, object]:
        error, engine = self.llm.error, self._engine()
        status = ("draining" if self.gate.closed else "ok" if error is None else "loading" if self.llm.loading
                  else "unavailable")
        ranks = engine.rank_states() if engine is not None else {}
        return {"status": status, "error": None if error is None else str(error),
                "ranks": [{"rank": r, "alive": alive} for r, alive in sorted(ranks.items())]}

    def stats(self) -> dict[str, object]:
        s, m, engine = self.llm.stats(), self.metrics, self._engine()
        queries, hits = s.get("prefix_cache_queries", 0), s.get("prefix_cache_hits", 0)
        total, free = s.get("kv_blocks_total", 0), s.get("kv_blocks_free", 0)
        cached = s.get("kv_blocks_cached", 0)
        recorder = engine.recorder if engine is not None else None
        return {
            "time": time.time(),
            "model": self.model_name,
            "health": self.health(),
            "requests": {"running": s.get("num_running", 0), "waiting": s.get("num_waiting", 0),
                         "in_flight_http": self.gate.in_flight},
            "batch_size": s.get("batch_size", 0),
            "kv_cache": {"blocks_total": total, "blocks_used": total - free, "blocks_cached": cached,
                         "blocks_free": free - cached, "usage_perc": s.get("kv_cache_usage", 0)},
            "prefix_cache": {"queried_tokens": queries, "hit_tokens": hits,
                             "hit_rate": hits / queries if queries else 0},
            "preemptions": s.get("num_preemptions", 0),
            "speculation": {"checked_tokens": s.get("spec_draft_tokens", 0),
                            "accepted_tokens": s.get("spec_accepted_tokens", 0)},
            # The same counters /metrics exports, so the two always agree.
            "totals": {"prompt_tokens": m.prompt_total, "generation_tokens": m.generation_total,
                       "requests_finished": m.finished_total},
            "recorder": recorder.snapshot() if recorder is not None else None,
        }

    def requests(self, limit: int) -> dict[str, object]:
        engine = self._engine()
        traces = engine.recorder.traces(limit) if engine is not None and engine.recorder is not None else []
        return {"time": time.time(), "requests": [self._trace_json(t, engine) for t in traces]}

    def _trace_json(self, t: RequestTrace, engine) -> dict[str, object]:
        epoch = engine.recorder.epoch
        state = ("finished" if t.finished is not None else "decode" if t.first_token is not None
                 else "prefill" if t.scheduled is not None else "waiting")
        out = {"id": t.request_id, "state": state, "arrival": epoch(t.arrival), "scheduled": epoch(t.scheduled),
               "first_token": epoch(t.first_token), "finished": epoch(t.finished), "finish_reason": t.finish_reason,
               "chunks": [[epoch(a), epoch(b), n] for a, b, n in t.chunks], "prompt_tokens": t.prompt_tokens,
               "cached_tokens": t.cached_tokens, "output_tokens": t.output_tokens, "preemptions": t.preemptions,
               "params": t.params, "tags": t.tags}
        if self.show_prompts and t.prompt_token_ids is not None:
            out["prompt"] = self._prompt_text(t, engine)
        return out

    def _prompt_text(self, t: RequestTrace, engine) -> str:
        if t.request_id not in self._prompts:
            self._prompts[t.request_id] = engine.tokenizer.decode(t.prompt_token_ids)
            if len(self._prompts) > _PROMPT_CACHE:
                self._prompts.popitem(last=False)
        return self._prompts[t.request_id]

    # ---- the shared stream ----

    async def _produce(self) -> None:
        while self._viewers:
            frame = f"data: {json.dumps({'stats': self.stats(), **self.requests(STREAM_REQUESTS)})}\n\n"
            for q in self._viewers:
                if q.qsize() >= _VIEWER_BACKLOG:
                    q.get_nowait()
                q.put_nowait(frame)
            await asyncio.sleep(1 / STREAM_HZ)
        self._producer = None

    async def events(self) -> AsyncIterator[str]:
        q: asyncio.Queue[str] = asyncio.Queue()
        self._viewers.add(q)
        if self._producer is None:
            self._producer = asyncio.create_task(self._produce())
        try:
            while True:
                yield await q.get()
                if self.gate.closed and not self.gate.in_flight:  # drained: it would only hold up the exit
                    return
        finally:
            self._viewers.discard(q)

    def add_routes(self, app: FastAPI) -> None:
        page = files("slipstream.entrypoints.openai").joinpath("static/dashboard.html").read_text()

        @app.get("/dashboard", include_in_schema=False)
        async def dashboard_page() -> HTMLResponse:
            return HTMLResponse(page)

        @app.get("/v1/engine/stats")
        async def engine_stats() -> dict:
            return self.stats()

        @app.get("/v1/engine/requests")
        async def engine_requests(limit: str = "50") -> dict:
            if not (limit.isascii() and limit.isdigit()) or not 1 <= int(limit) <= MAX_LIMIT:  # ('²' isdigit)
                raise APIError(f"limit: an integer in [1, {MAX_LIMIT}]", param="limit", code="invalid_value")
            return self.requests(int(limit))

        @app.get("/v1/engine/stream", include_in_schema=False)  # (endless: not for clients generated from the spec)
        async def engine_stream() -> StreamingResponse:
            return StreamingResponse(self.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
