"""Prometheus metrics of the server (text exposition format at GET /metrics).

Counters and histograms are per sequence (one per choice); gauges are read from the
engine thread's latest snapshot at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from specserve.engine.sequence import RequestMetrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
)
_AL_BUCKETS = (
    1.0,
    1.25,
    1.5,
    1.75,
    2.0,
    2.5,
    3.0,
    3.5,
    4.0,
    5.0,
    6.0,
    8.0,
    12.0,
    16.0,
    33.0,
)


class _Gauges(Collector):
    def __init__(
        self,
        read: Callable[[], dict[str, float]],
        per_position: Callable[[], tuple[list[int], list[int]]],
    ):
        self._read = read
        self._per_position = per_position

    def collect(self) -> Iterable[GaugeMetricFamily]:
        stats = self._read()
        for name, key, doc in (
            (
                "specserve_num_requests_running",
                "running",
                "Sequences in the running batch.",
            ),
            (
                "specserve_num_requests_waiting",
                "waiting",
                "Sequences waiting for a place in the batch.",
            ),
            (
                "specserve_num_requests_unfinished",
                "unfinished",
                "Sequences admitted by the server and not finished.",
            ),
            (
                "specserve_kv_cache_usage_ratio",
                "kv_usage",
                "Fraction of the KV cache in use (0..1).",
            ),
            (
                "specserve_ready",
                "ready",
                "1 when the model is loaded and the server takes requests.",
            ),
            (
                "specserve_draining",
                "draining",
                "1 while the server shuts down (finishing requests in flight).",
            ),
        ):
            yield GaugeMetricFamily(name, doc, value=float(stats.get(key, 0.0)))
        drafted, accepted = self._per_position()
        g = GaugeMetricFamily(
            "specserve_spec_acceptance_rate",
            "Accepted / drafted tokens per draft position since start (position 0 = first draft token).",
            labels=["position"],
        )
        for pos, (d, a) in enumerate(zip(drafted, accepted)):
            if d:
                g.add_metric([str(pos)], a / d)
        yield g


class ServerMetrics:
    def __init__(self, read_gauges: Callable[[], dict[str, float]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "specserve_http_requests",
            "HTTP requests by route and status code.",
            ["route", "status"],
            registry=r,
        )
        self.requests = Counter(
            "specserve_requests",
            "Finished sequences by finish reason (stop, length, abort, error).",
            ["finish_reason"],
            registry=r,
        )
        self.rejected = Counter(
            "specserve_requests_rejected",
            "Requests refused with 429 (waiting queue full).",
            registry=r,
        )
        self.prompt_tokens = Counter(
            "specserve_prompt_tokens",
            "Prompt tokens of admitted sequences.",
            registry=r,
        )
        self.generation_tokens = Counter("specserve_generation_tokens", "Generated tokens.", registry=r)
        self.ttft = Histogram(
            "specserve_time_to_first_token_seconds",
            "Time from the request's arrival to its first token.",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.itl = Histogram(
            "specserve_inter_token_latency_seconds",
            "Time between successive tokens of a sequence (a step that yields k tokens counts k times, gap/k each).",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.e2e = Histogram(
            "specserve_e2e_request_latency_seconds",
            "Arrival to last token.",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.drafted = Counter("specserve_spec_drafted_tokens", "Draft tokens proposed.", registry=r)
        self.accepted = Counter(
            "specserve_spec_accepted_tokens",
            "Draft tokens accepted by the verifier.",
            registry=r,
        )
        self.forward_passes = Counter(
            "specserve_spec_forward_passes",
            "Target forwards that produced tokens, summed over sequences.",
            registry=r,
        )
        self.acceptance_length = Histogram(
            "specserve_spec_acceptance_length",
            "Per finished sequence: tokens emitted per target forward (plain decoding = 1).",
            registry=r,
            buckets=_AL_BUCKETS,
        )
        self.drafted_pos = Counter(
            "specserve_spec_drafted_per_position",
            "Draft tokens proposed at each draft position.",
            ["position"],
            registry=r,
        )
        self.accepted_pos = Counter(
            "specserve_spec_accepted_per_position",
            "Draft tokens accepted at each draft position.",
            ["position"],
            registry=r,
        )
        self._drafted_by_pos: list[int] = []
        self._accepted_by_pos: list[int] = []
        r.register(
            _Gauges(
                read_gauges,
                lambda: (list(self._drafted_by_pos), list(self._accepted_by_pos)),
            )
        )

    def observe_finished(self, m: RequestMetrics, finish_reason: str) -> None:
        """Count one finished sequence (its tokens and latencies are counted as they stream)."""
        self.requests.labels(finish_reason).inc()
        if m.latency is not None:
            self.e2e.observe(max(m.latency, 0.0))
        if m.forward_passes:
            self.forward_passes.inc(m.forward_passes)
            self.acceptance_length.observe(m.generated_tokens / m.forward_passes)
        if m.drafted_tokens:
            self.drafted.inc(m.drafted_tokens)
            self.accepted.inc(m.accepted_tokens)
        for pos, n in enumerate(m.drafted_per_position):
            if n:
                self.drafted_pos.labels(str(pos)).inc(n)
                _add(self._drafted_by_pos, pos, n)
        for pos, n in enumerate(m.accepted_per_position):
            if n:
                self.accepted_pos.labels(str(pos)).inc(n)
                _add(self._accepted_by_pos, pos, n)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _add(values: list[int], pos: int, n: int) -> None:
    if len(values) <= pos:
        values.extend([0] * (pos + 1 - len(values)))
    values[pos] += n
