"""Asyncio front of the synchronous LLMEngine.

The engine lives in ONE background thread that builds it, then loops: run the commands the event
loop sent (add, abort, stop), step while there is work, block on the command queue when idle (no
busy spin). torch releases the GIL inside its kernels, so the event loop keeps serving HTTP while a
step runs. Outputs go back to the event loop with `call_soon_threadsafe`, one hop per step, into an
asyncio queue per request group, a request's tokens of one step in one output. A step that fails ends its own
requests (`EngineStepError`). If building the engine fails, or a step fails in a way the engine cannot survive
(under tensor parallelism), the engine is dead: every waiting request gets `EngineDeadError`, and so does every
later call (the server's /health says 503).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import NamedTuple

from slipstream.config import EngineConfig
from slipstream.engine.llm_engine import LLMEngine, ReasoningSpan
from slipstream.engine.output_processor import RequestOutput, merge_outputs
from slipstream.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

WORKER_CHECK_SECONDS = 1.0  # how often an idle engine checks that its tensor-parallel workers live
_Command = tuple[Callable[[], object] | None, asyncio.Future | None]  # (None, None) stops the thread


class EngineRequest(NamedTuple):
    """One engine request; a plain (request_id, prompt_token_ids, params) tuple is one too."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    reasoning: ReasoningSpan | None = None  # a thinking span to count and budget (--reasoning-parser)
    tags: dict[str, object] | None = None  # what the dashboard shows of its origin (endpoint, stream, tools)
    group: str | None = None  # the API request it is one sequence of (prompts x n): the scheduler admits them in turn


class EngineDeadError(RuntimeError):
    """The engine failed, is still loading, or was shut down: nothing can be served."""


class EngineStepError(RuntimeError):
    """The engine step that ran this request failed (the engine goes on with the others)."""


class AsyncLLM:
    def __init__(self, make_engine: Callable[[], LLMEngine],
                 on_output: Callable[[RequestOutput], None] | None = None) -> None:
        self._make_engine = make_engine
        self._on_output = on_output  # sees every output on the event loop (metrics)
        self._engine: LLMEngine | None = None
        self._error: EngineDeadError | None = None
        self._lock = threading.Lock()  # orders "submit a command" against "die and drain the commands"
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._queues: dict[str, asyncio.Queue] = {}  # request id -> its group's queue; event loop only
        self._stats: dict[str, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future | None = None
        self._died: asyncio.Future | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, config: EngineConfig, on_output: Callable[[RequestOutput], None] | None = None) -> AsyncLLM:
        return cls(partial(LLMEngine, config), on_output)

    # ---- lifecycle (event loop side) ----

    def start(self) -> None:
        """Start the engine thread; call from the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._died = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name="slipstream-engine", daemon=True)
        self._thread.start()

    async def wait_ready(self) -> None:
        """Return once the engine is built; raises EngineDeadError if building it failed."""
        await asyncio.shield(self._ready)

    async def wait_dead(self) -> EngineDeadError:
        """Return once the engine has died (failed, lost a worker, or shut down), with the reason."""
        return await asyncio.shield(self._died)

    def shutdown(self) -> None:
        with self._lock:
            if self._error is None:
                self._error = EngineDeadError("the server is shutting down")
            self._commands.put((None, None))
        if self._engine is not None:  # a thread still loading the model is a daemon: it ends with the process
            self._thread.join()
        self._fail_all(self._error)

    @property
    def error(self) -> EngineDeadError | None:
        """Why the engine cannot serve (still loading, failed, shut down), or None when it can."""
        if self._error is None and self._engine is None:
            return EngineDeadError("the model is still loading")
        return self._error

    @property
    def loading(self) -> bool:
        return self._error is None and self._engine is None

    @property
    def engine(self) -> LLMEngine:
        """The engine, for what never changes after load (tokenizer, max_model_len, config)."""
        if self.error is not None:
            raise self.error
        return self._engine

    def stats(self) -> dict[str, float]:
        """The engine's stats as of its last step or command."""
        return self._stats

    # ---- requests (event loop side) ----

    async def generate(self, requests: list[EngineRequest]) -> AsyncIterator[RequestOutput]:
        """Add a group of requests (one prompt's n samples, a batch of prompts) and return the stream
        of their outputs in arrival order. Raises here, before any output, if the engine refuses one
        (ContextLengthError, ValueError); none of the group runs then. Closing the stream early (a
        client that went away) aborts what is left of the group."""
        out_queue: asyncio.Queue = asyncio.Queue()
        ids = [r[0] for r in requests]
        for rid in ids:
            self._queues[rid] = out_queue
        # (Their arrival: now, not when the engine thread takes them between steps, so that the time they wait for
        # the step in progress counts in their queue time and TTFT, as a client sees it.)
        arrival = time.monotonic()
        try:
            await self._call(partial(self._add_all, requests, arrival))
        except BaseException as exc:
            for rid in ids:
                self._queues.pop(rid, None)
            if isinstance(exc, asyncio.CancelledError):  # the add may still land: take it back
                self.abort(ids)
            raise
        return self._stream(out_queue, ids)

    async def _stream(self, out_queue: asyncio.Queue, ids: list[str]) -> AsyncIterator[RequestOutput]:
        unfinished = set(ids)
        try:
            while unfinished:
                item = await out_queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    unfinished.discard(item.request_id)
                if item.finish_reason == "error":
                    raise EngineStepError(f"the engine step running this request failed: {item.error}")
                yield item
        finally:
            if unfinished:
                for rid in unfinished:
                    self._queues.pop(rid, None)
                self.abort(list(unfinished))

    def abort(self, ids: list[str]) -> None:
        """End these requests wherever they are (their streams end with finish_reason abort)."""
        try:
            self._submit(partial(self._abort_all, ids))
        except EngineDeadError:
            pass  # nothing runs any more

    async def _call(self, fn: Callable[[], object]) -> object:
        fut = self._loop.create_future()
        self._submit(fn, fut)
        return await fut

    def _submit(self, fn: Callable[[], object], fut: asyncio.Future | None = None) -> None:
        with self._lock:
            if self.error is not None:
                raise self.error
            self._commands.put((fn, fut))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if self._on_output is not None:
                self._on_output(out)
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)
                if out.finished:
                    del self._queues[out.request_id]

    def _fail_all(self, error: EngineDeadError, pending: list[asyncio.Future] = ()) -> None:
        for fut in pending:
            if not fut.done():
                fut.set_exception(error)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
        for q in set(self._queues.values()):
            q.put_nowait(error)
        self._queues.clear()
        if self._died is not None and not self._died.done():
            self._died.set_result(error)

    # ---- engine thread ----

    def _add_all(self, requests: list[EngineRequest], arrival: float) -> None:
        added = []
        try:
            for request in requests:
                rid, prompt_token_ids, params, reasoning, tags, group = EngineRequest(*request)
                self._engine.add_request(rid, prompt_token_ids, params, arrival_time=arrival, reasoning=reasoning,
                                         tags=tags, group=group)
                added.append(rid)
        except Exception:
            for rid in added:
                self._engine.abort_request(rid)
            raise

    def _abort_all(self, ids: list[str]) -> None:
        outputs = [out for rid in ids if (out := self._engine.abort_request(rid)) is not None]
        if outputs:  # nobody waits for them, but the metrics count them
            self._post(self._dispatch, outputs)

    def _post(self, fn: Callable, *args) -> None:
        self._loop.call_soon_threadsafe(fn, *args)

    def _run(self) -> None:
        try:
            self._engine = self._make_engine()
        except Exception as exc:
            self._die(EngineDeadError(f"failed to load the model: {exc}"), exc)
            return
        self._post(_settle, self._ready, None, None)  # (a shutdown during the load has settled it)
        engine = self._engine
        while True:
            # Run every queued command before the next step; wait for one only when idle.
            while True:
                idle = not engine.has_unfinished()
                try:
                    fn, fut = self._commands.get(block=idle, timeout=WORKER_CHECK_SECONDS if idle else None)
                except queue.Empty:
                    if idle and (dead := engine.dead_workers()):
                        self._die(EngineDeadError(f"tensor-parallel worker exited: {', '.join(dead)}"), None)
                        engine.shutdown()
                        return
                    if idle:
                        continue
                    break
                if fn is None:
                    engine.shutdown()
                    return
                self._run_command(fn, fut)
                self._stats = engine.stats()  # an abort frees blocks and slots without a step
            try:
                outputs = engine.step()
                self._stats = engine.stats()
            except Exception as exc:
                logger.exception("engine step failed; the engine is dead")
                self._die(EngineDeadError(f"the engine failed: {exc}"), exc)
                engine.shutdown()
                return
            if outputs:
                self._post(self._dispatch, _one_per_request(outputs))

    def _run_command(self, fn: Callable[[], object], fut: asyncio.Future | None) -> None:
        try:
            result, error = fn(), None
        except Exception as exc:  # a refused request, not a broken engine
            result, error = None, exc
        if fut is not None:
            self._post(_settle, fut, result, error)

    def _die(self, error: EngineDeadError, cause: Exception | None) -> None:
        error.__cause__ = cause
        with self._lock:
            self._error = error
            pending = []
            while True:
                try:
                    _, fut = self._commands.get_nowait()
                except queue.Empty:
                    break
                if fut is not None:
                    pending.append(fut)
        self._post(self._fail_all, error, pending)


def _settle(fut: asyncio.Future, result: object, error: BaseException | None) -> None:
    if fut.done():  # the caller was cancelled meanwhile
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _one_per_request(outputs: list[RequestOutput]) -> list[RequestOutput]:
    """A step's outputs with each request's consecutive deltas (a guess that stood, then its next token) merged: one
    stream chunk for what a step made, as vLLM streams, so the event loop and the client handle fewer."""
    merged: list[RequestOutput] = []
    for out in outputs:
        if merged and merged[-1].request_id == out.request_id:
            merged[-1] = merge_outputs(merged[-1], out)
        else:
            merged.append(out)
    return merged
