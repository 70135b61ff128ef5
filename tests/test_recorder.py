"""The dashboard's recorder (engine/recorder.py): its maths against numpy, its ring buffers' bounds, and what it
records of a request's life, driven with the engine's own Sequence / ScheduledSeq objects."""

from __future__ import annotations

import random

import numpy as np
import pytest

from slipstream.engine import recorder as rec
from slipstream.engine.block_manager import BlockManager
from slipstream.engine.recorder import EngineRecorder, percentile, summarize
from slipstream.engine.scheduler import ScheduledSeq
from slipstream.engine.sequence import Sequence
from slipstream.sampling_params import SamplingParams, StructuredOutputsParams


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 1000])
def test_percentiles_match_numpy(n: int) -> None:
    rng = random.Random(n)
    values = sorted(rng.expovariate(5) for _ in range(n))
    for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12, abs=1e-15)
    s = summarize(values)
    assert s["count"] == n and s["mean"] == pytest.approx(np.mean(values))
    assert s["p99"] == pytest.approx(np.percentile(values, 99))


def test_summary_of_nothing() -> None:
    assert summarize([]) == {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None}
    with pytest.raises(ValueError):
        percentile([], 50)


def _seq(rid: str, prompt_len: int, arrival: float, **params) -> Sequence:
    seq = Sequence(rid, list(range(1, prompt_len + 1)), SamplingParams(**params))
    seq.arrival_time = arrival
    return seq


def _decode(seq: Sequence, recorder: EngineRecorder, start: float, end: float) -> None:
    recorder.step([ScheduledSeq(seq, 1)], start, end, [seq], [])
    seq.num_computed_tokens += 1
    seq.token_ids.append(7)


def test_a_request_trace_from_arrival_to_finish() -> None:
    r = EngineRecorder()
    seq = _seq("a", 40, 100.0, temperature=0.5, max_tokens=3, stop=["x"],
               structured_outputs=StructuredOutputsParams(json={"type": "object"}))
    r.add(seq, {"endpoint": "chat", "tools": 2})
    # Two prefill chunks (the first samples nothing), then decode steps.
    r.step([ScheduledSeq(seq, 32)], 100.5, 100.6, [], [])
    seq.num_computed_tokens = 32
    r.step([ScheduledSeq(seq, 8)], 100.6, 100.7, [seq], [])
    seq.num_computed_tokens = 40
    seq.token_ids.append(5)
    _decode(seq, r, 100.7, 100.75)
    _decode(seq, r, 100.75, 100.85)
    r.finish(seq, 100.85, "length")
    [t] = r.traces(10)
    assert (t.scheduled, t.first_token, t.finished, t.finish_reason) == (100.5, 100.7, 100.85, "length")
    assert t.chunks == [[100.5, 100.6, 32], [100.6, 100.7, 8]]
    assert t.output_tokens == 3 and t.prompt_tokens == 40
    assert t.params["temperature"] == 0.5 and t.params["constrained"] == "json" and t.params["stops"] == 1
    assert t.tags == {"endpoint": "chat", "tools": 2} and t.prompt_token_ids is None
    snap = r.snapshot(now=101.0)
    lat = snap["latency"]
    assert lat["ttft"]["count"] == 1 and lat["ttft"]["p50"] == pytest.approx(0.7)
    assert lat["itl"]["count"] == 2 and lat["itl"]["p50"] == pytest.approx(0.075)
    assert lat["tpot"]["p50"] == pytest.approx(0.075) and lat["e2e"]["p50"] == pytest.approx(0.85)
    [bucket] = snap["buckets"]
    counts = (bucket["steps"], bucket["prefill_tokens"], bucket["decode_tokens"], bucket["sampled_tokens"])
    assert counts == (4, 40, 2, 3)
    assert bucket["start"] == pytest.approx(100.0 + r.wall_offset)
    assert snap["steps"]["total"] == 4 and 0 < snap["steps"]["recorder_perc"] < 1
    assert snap["traced_requests"] == 0


def test_preemption_and_abort_are_recorded() -> None:
    r = EngineRecorder(keep_prompts=True)
    seq = _seq("b", 5, 10.0)
    r.add(seq, None)
    r.step([ScheduledSeq(seq, 5)], 10.1, 10.2, [seq], [])
    r.step([], 10.2, 10.3, [], [seq])
    r.finish(seq, 10.4, "abort")
    [t] = r.traces(1)
    assert t.preemptions == 1 and t.finish_reason == "abort" and t.prompt_token_ids == [1, 2, 3, 4, 5]


def test_latencies_outside_the_window_are_left_out() -> None:
    r = EngineRecorder()
    for i, arrival in enumerate((0.0, 100.0)):
        seq = _seq(f"r{i}", 3, arrival)
        r.add(seq, None)
        r.step([ScheduledSeq(seq, 3)], arrival, arrival + 0.5, [seq], [])
    assert r.snapshot(now=100.5)["latency"]["ttft"]["count"] == 1  # the first is 100 s old
    assert r.snapshot(now=60.0)["latency"]["ttft"]["count"] == 2


def test_ring_buffers_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rec, "MAX_ACTIVE_TRACES", 50)
    monkeypatch.setattr(rec, "MAX_CHUNKS", 4)
    r = EngineRecorder()
    long = _seq("long", 10_000, 0.0)
    r.add(long, None)
    t = 0.0
    for _ in range(100):  # a prompt prefilled in 100 chunks: the last chunk absorbs the rest
        r.step([ScheduledSeq(long, 100)], t, t + 0.01, [], [])
        long.num_computed_tokens += 100
        t += 0.01
    [trace] = r.traces(1)
    assert len(trace.chunks) == 4 and sum(c[2] for c in trace.chunks) == 10_000
    assert trace.chunks[-1][1] == pytest.approx(t)
    r.finish(long, t, "stop")
    for i in range(3 * rec.MAX_TRACES):
        seq = _seq(f"s{i}", 2, t)
        r.add(seq, None)
        r.step([ScheduledSeq(seq, 2)], t, t + 0.001, [seq], [])
        for _ in range(15):
            _decode(seq, r, t, t + 0.001)
            t += 0.001
        r.finish(seq, t, "length")
        t += rec.BUCKET_S
    assert len(r._done) == rec.MAX_TRACES and not r._active
    assert len(r._buckets) == rec.NUM_BUCKETS
    assert len(r._itl) == rec.MAX_LATENCY_SAMPLES
    newest = r.traces(500)
    assert len(newest) == rec.MAX_TRACES and newest[0].request_id == f"s{3 * rec.MAX_TRACES - 1}"
    # Beyond MAX_ACTIVE_TRACES requests in the engine at once, the rest go untraced.
    for i in range(60):
        r.add(_seq(f"w{i}", 2, t), None)
    assert len(r._active) == 50


def test_block_manager_counts_free_blocks_that_hold_cached_content() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    rng = random.Random(0)

    def check() -> None:
        assert bm.num_cached_free == sum(1 for b in bm.free if bm.block_hash[b] is not None)

    live: list[Sequence] = []
    for i in range(200):
        if live and (rng.random() < 0.5 or bm.num_free_blocks < 3):
            bm.free_blocks(live.pop(rng.randrange(len(live))))
        else:
            seq = _seq(f"q{i}", 0, 0.0)
            seq.token_ids = [rng.randrange(3) for _ in range(rng.randrange(2, 10))]  # few values: prefixes repeat
            seq.prompt_token_ids = list(seq.token_ids)
            prefix = bm.lookup_prefix(seq)
            if bm.allocate(seq, seq.num_tokens - len(prefix) * 4, prefix):
                seq.num_computed_tokens = seq.num_tokens
                bm.cache_full_blocks(seq)
                live.append(seq)
        check()
    assert bm.num_cached_free > 0
