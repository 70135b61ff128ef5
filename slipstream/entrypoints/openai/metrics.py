"""Prometheus metrics for /metrics: per-request latencies and token counts observed from the engine's
outputs, plus the engine's own gauges and counters read at scrape time.

Names are vLLM's (`vllm:` there) where it has one; FastDeploy's dashboards read the same names with its
`fastdeploy:` prefix, and its own extras are here too (requests_number, request_queue/prefill/decode_time_seconds,
batch_size, hit_token_rate, cache_usage_perc): README.md lists the mapping."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from slipstream.engine.output_processor import RequestOutput

# A CPU server's requests take from milliseconds to minutes.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class _EngineCollector:
    """Reads the engine's stats (as of its last step) at each scrape."""

    def __init__(self, stats: Callable[[], dict[str, float]], model_name: str) -> None:
        self.stats = stats
        self.model_name = model_name

    def collect(self):
        s = self.stats()
        label = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"slipstream:{name}", doc, labels=["model_name"])
            g.add_metric(label, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"slipstream:{name}", doc, labels=["model_name"])
            c.add_metric(label, value)
            return c

        queries, hits = s.get("prefix_cache_queries", 0), s.get("prefix_cache_hits", 0)
        yield gauge("num_requests_running", "Requests in the running batch.", s.get("num_running", 0))
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s.get("num_waiting", 0))
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", s.get("kv_cache_usage", 0))
        yield gauge("cache_usage_perc", "FastDeploy's name of kv_cache_usage_perc.", s.get("kv_cache_usage", 0))
        yield gauge("batch_size", "Sequences in the engine's last step (0 when idle).", s.get("batch_size", 0))
        yield counter("prefix_cache_queries", "Prefix-cache lookups.", queries)
        yield counter("prefix_cache_hits", "Prefix-cache lookups that hit.", hits)
        yield gauge("prefix_cache_hit_rate", "Prefix-cache hits / lookups so far.", hits / queries if queries else 0)
        yield counter("num_preemptions", "Sequences preempted for lack of KV blocks.", s.get("num_preemptions", 0))
        yield counter("spec_decode_num_draft_tokens", "Tokens guessed by n-gram speculation and checked.",
                      s.get("spec_draft_tokens", 0))
        yield counter("spec_decode_num_accepted_tokens", "Guessed tokens the model agreed with (steps saved).",
                      s.get("spec_accepted_tokens", 0))


class _HitTokenRate:
    """FastDeploy's hit_token_rate: prompt tokens served from the prefix cache / prompt tokens."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        g = GaugeMetricFamily("slipstream:hit_token_rate", self.__doc__.strip(), labels=["model_name"])
        g.add_metric([m.model_name], m.cached_total / m.prompt_total if m.prompt_total else 0.0)
        yield g


class Metrics:
    def __init__(self, model_name: str, engine_stats: Callable[[], dict[str, float]]) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels, reg = ["model_name"], self.registry
        # Every metric but request_success has the model name as its only label: each is its labelled child, bound
        # once (a labels() lookup for every token was a sixth of the event loop's work for a streamed token).
        self.requests = Counter("slipstream:request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=reg)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=reg).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=reg).labels(model_name)

        self.requests_number = counter("slipstream:requests_number", "Requests received (by the engine).")
        self.prompt_tokens = counter("slipstream:prompt_tokens", "Prefilled prompt tokens.")
        self.cached_tokens = counter("slipstream:prompt_tokens_cached", "Prompt tokens served from the prefix cache.")
        self.generation_tokens = counter("slipstream:generation_tokens", "Generated tokens.")
        self.ttft = histogram("slipstream:time_to_first_token_seconds", "Time to the first token.", _LATENCY_BUCKETS)
        self.tpot = histogram("slipstream:time_per_output_token_seconds", "Mean time per output token after the "
                              "first, per request.", _TOKEN_LATENCY_BUCKETS)
        self.itl = histogram("slipstream:inter_token_latency_seconds", "Time between consecutive output tokens.",
                             _TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("slipstream:e2e_request_latency_seconds", "Arrival to last token.", _LATENCY_BUCKETS)
        self.queue_time, self.prefill_time, self.decode_time = (
            histogram(f"slipstream:request_{phase}_time_seconds", doc, _LATENCY_BUCKETS)
            for phase, doc in (("queue", "Arrival to the first engine step."),
                               ("prefill", "First engine step to the first token."),
                               ("decode", "First token to the last.")))
        reg.register(_EngineCollector(engine_stats, model_name))
        reg.register(_HitTokenRate(self))
        self._first_token_time: dict[str, float] = {}  # request id -> TTFT, until it finishes
        self._last_token_time: dict[str, float] = {}  # request id -> its latest token's time since arrival
        self._seen: set[str] = set()  # requests with an output so far, until they finish
        # Plain totals of the counters above, for hit_token_rate and the dashboard.
        self.prompt_total = self.cached_total = self.generation_total = self.finished_total = 0

    def observe(self, out: RequestOutput) -> None:
        """Account for one engine output (called on the event loop for every output)."""
        if out.request_id not in self._seen:
            self._seen.add(out.request_id)
            self.requests_number.inc()
        if out.token_ids:
            self.generation_tokens.inc(len(out.token_ids))
            self.generation_total += len(out.token_ids)
            previous = self._last_token_time.get(out.request_id)
            for t in out.arrival_times:
                if previous is not None:
                    self.itl.observe(t - previous)
                previous = t
            self._last_token_time[out.request_id] = previous
            if out.num_output_tokens == len(out.token_ids):  # the request's first tokens
                self.prompt_tokens.inc(len(out.prompt_token_ids))
                self.cached_tokens.inc(out.num_cached_tokens)
                self.prompt_total += len(out.prompt_token_ids)
                self.cached_total += out.num_cached_tokens
                self._first_token_time[out.request_id] = out.arrival_times[0]
                self.ttft.observe(out.arrival_times[0])
        if not out.finished:
            return
        self._seen.discard(out.request_id)
        self.requests.labels(self.model_name, out.finish_reason).inc()
        self.finished_total += 1
        self._last_token_time.pop(out.request_id, None)
        ttft = self._first_token_time.pop(out.request_id, None)
        if out.arrival_times and ttft is not None:
            e2e = out.arrival_times[-1]
            self.e2e.observe(e2e)
            self.decode_time.observe(e2e - ttft)
            if out.queue_time is not None:
                self.queue_time.observe(out.queue_time)
                self.prefill_time.observe(max(0.0, ttft - out.queue_time))
            if out.num_output_tokens > 1:
                self.tpot.observe((e2e - ttft) / (out.num_output_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
