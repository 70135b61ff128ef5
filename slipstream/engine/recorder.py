"""What the engine did, for the dashboard: per-second step buckets, latency samples and one trace per
request, all in ring buffers, so memory stays bounded whatever the traffic.

Written by the engine thread (from `LLMEngine.step` and `abort_request`), read by the API's event loop
through `snapshot()` / `traces()` under one lock; the recorder times its own work so that its cost can be
read off next to the step time it is part of.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field

from slipstream.engine.sequence import Sequence

BUCKET_S = 1.0  # width of one step bucket (the batch-composition strip)
NUM_BUCKETS = 300  # five minutes of buckets
LATENCY_WINDOW_S = 60.0  # percentiles cover the last minute
MAX_LATENCY_SAMPLES = 8192  # per kind; the oldest go first
MAX_TRACES = 200  # finished requests kept for the timeline
MAX_ACTIVE_TRACES = 4096  # requests in the engine at once beyond this are not traced
MAX_CHUNKS = 64  # prefill chunks kept per request (a long recompute merges the rest into the last)
THROUGHPUT_WINDOW_S = 10.0


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of ascending values, interpolated linearly between the two nearest
    ranks, as numpy.percentile's default does."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(values: list[float]) -> dict[str, float | int | None]:
    """count, mean and p50/p90/p99 of `values` (None when there are none)."""
    if not values:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None}
    s = sorted(values)
    return {"count": len(s), "mean": sum(s) / len(s), "p50": percentile(s, 50), "p90": percentile(s, 90),
            "p99": percentile(s, 99)}


@dataclass
class StepBucket:
    start: float  # monotonic time the bucket starts at
    steps: int = 0
    prefill_tokens: int = 0  # prompt (or recomputed) tokens run
    decode_tokens: int = 0  # one per sequence that continued its output
    sampled_tokens: int = 0
    busy_s: float = 0.0  # time spent in steps


@dataclass
class RequestTrace:
    """One request's life: queued until `scheduled`, prefill chunks, decode until `finished`."""

    request_id: str
    arrival: float
    prompt_tokens: int
    params: dict[str, object]
    tags: dict[str, object]
    scheduled: float | None = None
    chunks: list[list[float]] = field(default_factory=list)  # [start, end, tokens] per prefill chunk
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    finish_reason: str | None = None
    output_tokens: int = 0
    cached_tokens: int = 0
    preemptions: int = 0
    prompt_token_ids: list[int] | None = None  # only when the dashboard may show prompts


def _params_summary(seq: Sequence) -> dict[str, object]:
    p = seq.params
    summary: dict[str, object] = {"temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k,
                                  "max_tokens": p.max_tokens, "seed": p.seed}
    if p.stop or p.stop_token_ids:
        summary["stops"] = len(p.stop) + len(p.stop_token_ids)
    if p.logprobs is not None:
        summary["logprobs"] = p.logprobs
    if p.structured_outputs is not None:
        summary["constrained"] = p.structured_outputs.kind
    return summary


class EngineRecorder:
    def __init__(self, keep_prompts: bool = False) -> None:
        self.keep_prompts = keep_prompts
        self._lock = threading.Lock()
        self._buckets: deque[StepBucket] = deque(maxlen=NUM_BUCKETS)
        self._ttft: deque[tuple[float, float]] = deque(maxlen=MAX_LATENCY_SAMPLES)
        self._itl: deque[tuple[float, float]] = deque(maxlen=MAX_LATENCY_SAMPLES)
        self._tpot: deque[tuple[float, float]] = deque(maxlen=MAX_LATENCY_SAMPLES)
        self._e2e: deque[tuple[float, float]] = deque(maxlen=MAX_LATENCY_SAMPLES)
        self._active: OrderedDict[str, RequestTrace] = OrderedDict()
        self._done: deque[RequestTrace] = deque(maxlen=MAX_TRACES)
        self.num_steps = 0
        self.step_seconds = 0.0  # time in steps, the recorder's share included
        self.record_seconds = 0.0  # time in the recorder's own methods
        self.wall_offset = time.time() - time.monotonic()  # monotonic -> epoch seconds

    # ---- engine thread ----

    def add(self, seq: Sequence, tags: dict[str, object] | None) -> None:
        t0 = time.perf_counter()
        if len(self._active) < MAX_ACTIVE_TRACES:
            trace = RequestTrace(seq.request_id, seq.arrival_time, seq.num_prompt_tokens, _params_summary(seq),
                                 dict(tags or {}))
            if self.keep_prompts:
                trace.prompt_token_ids = seq.prompt_token_ids
            with self._lock:
                self._active[seq.request_id] = trace
        self.record_seconds += time.perf_counter() - t0

    def step(self, batch: list, start: float, end: float, sampled: list[Sequence], preempted: list[Sequence]) -> None:
        """One engine step from `start` to `end` (monotonic), recorded before the engine applies its results:
        `batch` its ScheduledSeqs, `sampled` the sequences that get a token, `preempted` those the scheduler
        preempted to make room for it."""
        t0 = time.perf_counter()
        prefill = decode = 0
        with self._lock:
            for s in batch:
                seq = s.seq
                trace = self._active.get(seq.request_id)
                is_decode = s.num_new_tokens - len(s.draft) == 1 and seq.num_output_tokens > 0  # (guesses aside)
                if is_decode:
                    decode += 1
                else:
                    prefill += s.num_new_tokens
                if trace is None:
                    continue
                if trace.scheduled is None:
                    trace.scheduled = start
                    trace.cached_tokens = seq.num_cached_tokens
                if not is_decode:
                    if len(trace.chunks) < MAX_CHUNKS:
                        trace.chunks.append([start, end, s.num_new_tokens])
                    else:
                        trace.chunks[-1][1] = end
                        trace.chunks[-1][2] += s.num_new_tokens
            for seq in sampled:
                trace = self._active.get(seq.request_id)
                if trace is None:
                    continue
                if trace.first_token is None:
                    trace.first_token = end
                    self._ttft.append((end, end - trace.arrival))
                else:
                    self._itl.append((end, end - trace.last_token))
                trace.last_token = end
                trace.output_tokens += 1
            for seq in preempted:
                if (trace := self._active.get(seq.request_id)) is not None:
                    trace.preemptions += 1
            bucket = self._bucket(start)
            bucket.steps += 1
            bucket.prefill_tokens += prefill
            bucket.decode_tokens += decode
            bucket.sampled_tokens += len(sampled)
            bucket.busy_s += end - start
        self.num_steps += 1
        self.step_seconds += end - start
        spent = time.perf_counter() - t0
        self.record_seconds += spent
        self.step_seconds += spent

    def finish(self, seq: Sequence, when: float, reason: str) -> None:
        t0 = time.perf_counter()
        with self._lock:
            trace = self._active.pop(seq.request_id, None)
            if trace is not None:
                trace.finished = when
                trace.finish_reason = reason
                trace.output_tokens = seq.num_output_tokens
                if trace.first_token is not None:
                    self._e2e.append((when, when - trace.arrival))
                    if trace.output_tokens > 1:
                        self._tpot.append((when, (trace.last_token - trace.first_token) / (trace.output_tokens - 1)))
                self._done.append(trace)
        self.record_seconds += time.perf_counter() - t0

    def _bucket(self, t: float) -> StepBucket:
        start = t - t % BUCKET_S
        if not self._buckets or self._buckets[-1].start < start:
            self._buckets.append(StepBucket(start))
        return self._buckets[-1]

    # ---- readers (any thread) ----

    def epoch(self, t: float | None) -> float | None:
        return None if t is None else t + self.wall_offset

    def snapshot(self, now: float | None = None) -> dict[str, object]:
        """Step buckets of the last NUM_BUCKETS seconds, tokens/s over the last THROUGHPUT_WINDOW_S seconds and
        latency percentiles over the last LATENCY_WINDOW_S seconds (times in seconds; bucket starts in epoch)."""
        now = time.monotonic() if now is None else now
        since = now - LATENCY_WINDOW_S
        with self._lock:
            buckets = [asdict(b) for b in self._buckets]
            latency = {name: [v for t, v in samples if t >= since]
                       for name, samples in (("ttft", self._ttft), ("tpot", self._tpot), ("itl", self._itl),
                                             ("e2e", self._e2e))}
            active = len(self._active)
        recent = [b for b in buckets if b["start"] >= now - THROUGHPUT_WINDOW_S]
        window = min(THROUGHPUT_WINDOW_S, max(BUCKET_S, now - recent[0]["start"])) if recent else THROUGHPUT_WINDOW_S
        for b in buckets:
            b["start"] = self.epoch(b["start"])
        busy = sum(b["busy_s"] for b in recent)
        steps = sum(b["steps"] for b in recent)
        return {
            "buckets": buckets,
            "bucket_s": BUCKET_S,
            "throughput": {"window_s": THROUGHPUT_WINDOW_S,
                           "prompt_tokens_per_s": sum(b["prefill_tokens"] for b in recent) / window,
                           "generation_tokens_per_s": sum(b["sampled_tokens"] for b in recent) / window,
                           "busy_perc": min(1.0, busy / window)},
            "latency": {"window_s": LATENCY_WINDOW_S, **{k: summarize(v) for k, v in latency.items()}},
            "steps": {"total": self.num_steps, "busy_s": self.step_seconds, "recorder_s": self.record_seconds,
                      "mean_step_ms": 1000 * busy / steps if steps else None,  # (over the throughput window)
                      "recorder_perc": self.record_seconds / self.step_seconds if self.step_seconds else 0.0},
            "traced_requests": active,
        }

    def traces(self, limit: int) -> list[RequestTrace]:
        """The newest `limit` requests, in the engine or finished, newest first (copies)."""
        with self._lock:
            newest = sorted([*self._active.values(), *self._done], key=lambda t: t.arrival, reverse=True)[:limit]
            return [RequestTrace(**{**vars(t), "chunks": [list(c) for c in t.chunks]}) for t in newest]
