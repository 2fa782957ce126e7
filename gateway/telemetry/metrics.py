"""Prometheus metrics, served on their own HTTP port (never on the gRPC port)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import accumulate

import numpy as np
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gateway.telemetry.statistics import FAILURE_REASONS, ModelStatistics
from gateway.types import OUTCOMES

__all__ = ["CounterSource", "CoverageSource", "GatewayMetrics", "VersionSource"]

# (model, version, contract version, feature names, counts[feature, outcome]) per served version.
CoverageSource = Callable[[], Iterable[tuple[str, str, str, Sequence[str], NDArray[np.int64]]]]

# (model, version, its statistics) per loaded version: Triton's nv_* metrics, at scrape time.
VersionSource = Callable[[], Iterable[tuple[str, str, ModelStatistics]]]

# (label values, value) per sample of a counter read at scrape time.
CounterSource = Callable[[], Iterable[tuple[Sequence[str], float]]]

# Latency buckets from 100 us to 10 s: inference on small models is sub-millisecond.
_LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip


_MAX_SERIES = 10_000
_OTHER = "(other)"


class GatewayMetrics:
    """The gateway's metrics in a registry of their own (tests build as many as they like)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Every answered request, counted in plain numbers and read at scrape time: the
        # request path takes no metric lock (``observe``).
        self._answered = _Answered()
        self.registry.register(self._answered)
        self.in_flight = Gauge(
            "gateway_requests_in_flight",
            "OIP requests received and not yet answered, by RPC.",
            ["rpc"],
            registry=self.registry,
        )
        labels = ["model", "version"]
        self.queue_seconds = Histogram(
            "gateway_queue_duration_seconds",
            "Time a request waited in its model version's queue before its batch started.",
            labels,
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.compute_seconds = Histogram(
            "gateway_compute_duration_seconds",
            "Time of one model run (a batch).",
            labels,
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "gateway_batch_rows",
            "Rows in one model run.",
            labels,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "gateway_queue_depth",
            "Requests (or chunks of oversize requests) waiting in the queue.",
            labels,
            registry=self.registry,
        )
        self.rejections = Counter(
            "gateway_rejections",
            "Requests refused or dropped by the scheduler: queue_full, expected_wait, deadline, "
            "loop_lag.",
            [*labels, "reason"],
            registry=self.registry,
        )
        self.ledger_folded = Counter(
            "gateway_ledger_folded",
            "Requests the cost ledger added to a window's (other) row: it was at its key "
            "bound (costs.max_keys per window, costs.max_lines in all).",
            registry=self.registry,
        )
        self.loop_lag = Gauge(
            "gateway_event_loop_lag_seconds",
            "How far behind its timers the event loop runs (admission refuses a request whose "
            "deadline leaves less).",
            registry=self.registry,
        )
        self.models_ready = Gauge(
            "gateway_model_versions_ready",
            "Model versions loaded and ready to serve.",
            registry=self.registry,
        )
        self.native = Gauge(
            "gateway_native_extension",
            "Per native module (Cython): 1 when it is in use, 0 when its pure-Python twin runs.",
            ["module"],
            registry=self.registry,
        )
        self.events = Counter(
            "gateway_events",
            "Prediction events by outcome: recorded (a prediction answered), written (in the "
            "write-ahead log), acked (stored by the sidecar, or taken by the broker), dropped "
            "(deleted before the sidecar acknowledged them, on_full=drop_oldest: never sent, "
            "or sent and the stream ended without their ack), corrupt (lost to a damaged log), "
            "shed (predictions refused at the bound, on_full=shed).",
            ["outcome"],
            registry=self.registry,
        )
        self.events_backlog = Gauge(
            "gateway_events_backlog",
            "Prediction events not yet acknowledged by the sidecar, by where they wait.",
            ["where"],
            registry=self.registry,
        )
        self.events_log_bytes = Gauge(
            "gateway_events_log_bytes",
            "Bytes of the prediction event write-ahead log on disk.",
            registry=self.registry,
        )
        self.events_connected = Gauge(
            "gateway_events_sidecar_connected",
            "1 while the event stream to the sidecar (or the broker, events.sink: broker) is "
            "open, else 0.",
            registry=self.registry,
        )
        self.events_broker_full = Counter(
            "gateway_events_broker_full",
            "Publishes refused because a broker partition held events.broker.max_batches "
            "unconsumed batches (the events wait in the write-ahead log).",
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "gateway_fallbacks",
            "Attempts that failed over to the route's next fallback, by the variant that "
            "failed and why (the gRPC status of its failure).",
            ["route", "variant", "reason"],
            registry=self.registry,
        )
        self.shadows = Counter(
            "gateway_shadow_requests",
            "Shadow copies by outcome: ok, failed, skipped (the shadow concurrency cap).",
            ["route", "variant", "outcome"],
            registry=self.registry,
        )
        self.limited = Counter(
            "gateway_limited",
            "Requests refused before any work: rate (a tenant over its rate limit), "
            "concurrency (a route at max_concurrency), budget (a spent budget, policy reject).",
            ["reason"],
            registry=self.registry,
        )
        self.state_errors = Counter(
            "gateway_state_errors",
            "Calls to the shared state (state.backend: redis) that failed or took longer than "
            "state.timeout_ms, by concern; each was answered as its on_error says.",
            ["concern"],
            registry=self.registry,
        )
        self.auth_refused = Counter(
            "gateway_auth_refused",
            "Calls refused for their credential, by RPC and reason: missing, unknown, expired, "
            "not_admin, admin_off (no admin.token).",
            ["rpc", "reason"],
            registry=self.registry,
        )
        self.auth_reloads = Counter(
            "gateway_auth_keys_reloads",
            "Re-reads of auth.keys_file after it changed: loaded, or failed (the keys loaded "
            "before stay).",
            ["outcome"],
            registry=self.registry,
        )
        self.admin_actions = Counter(
            "gateway_admin_actions",
            "Calls of RPCs that need admin rights (each also a line of the audit log), by RPC "
            "and outcome (a gRPC status name).",
            ["rpc", "outcome"],
            registry=self.registry,
        )
        self.cache_bytes = Gauge(
            "gateway_cache_bytes", "Bytes held by the response cache.", registry=self.registry
        )
        self.cache_entries = Gauge(
            "gateway_cache_entries", "Rows held by the response cache.", registry=self.registry
        )
        self.budget_spent = Gauge(
            "gateway_budget_spent",
            "Spend in the budget's current window, by budget.",
            ["budget"],
            registry=self.registry,
        )
        self.budget_exceeded = Gauge(
            "gateway_budget_exceeded",
            "1 while the budget's current window is spent, else 0.",
            ["budget", "policy"],
            registry=self.registry,
        )
        self._server: object | None = None

    def observe(self, rpc: str, model: str, version: str, code: str, seconds: float) -> None:
        """An answered request: ``gateway_requests_total`` and its latency histogram."""
        self._answered.add(rpc, model, version, code, seconds)

    def counter_function(
        self, name: str, documentation: str, labels: Sequence[str], source: CounterSource
    ) -> None:
        """A counter whose samples ``source`` gives at scrape time: the request path keeps
        plain numbers and pays no metric lock (``source`` is read on the scrape thread; a
        dict it iterates must be copied by it)."""
        self.registry.register(_FunctionCounter(name, documentation, labels, source))

    def gauge_function(
        self, name: str, documentation: str, labels: Sequence[str], source: CounterSource
    ) -> None:
        """A gauge whose samples ``source`` gives at scrape time (as ``counter_function``)."""
        self.registry.register(_FunctionCounter(name, documentation, labels, source, gauge=True))

    def watch_versions(self, source: VersionSource, cache: bool) -> None:
        """Triton's per-model metrics (``nv_inference_*``, ``nv_cache_*`` when ``cache``) from
        each loaded version's statistics, read at scrape time: a Triton dashboard works
        pointed at this endpoint."""
        self.registry.register(_TritonCollector(source, self.queue_depth, cache))

    def watch_coverage(self, source: CoverageSource) -> None:
        """Export feature coverage, read from ``source`` at scrape time (no per-request cost)."""
        self.registry.register(_CoverageCollector(source))

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint in a daemon thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # type: ignore[attr-defined]
            self._server.server_close()  # type: ignore[attr-defined]
            self._server = None


# Triton's names: counters without a _total suffix (prometheus_client would add one to a
# counter family), so they are exposed untyped under exactly these names; times in us.
_TRITON_COUNTERS: tuple[tuple[str, str, Callable[[ModelStatistics], float]], ...] = (
    ("nv_inference_request_success", "Successful requests.", lambda s: s.success.count),
    ("nv_inference_count", "Inferences (rows) computed.", lambda s: s.inference_count),
    ("nv_inference_exec_count", "Model executions (batches).", lambda s: s.execution_count),
    (
        "nv_inference_request_duration_us",
        "Cumulative time of successful requests, us.",
        lambda s: s.success.ns // 1000,
    ),
    ("nv_inference_queue_duration_us", "Cumulative queue time, us.", lambda s: s.queue.ns // 1000),
    (
        "nv_inference_compute_input_duration_us",
        "Cumulative time preparing inputs, us.",
        lambda s: s.compute_input.ns // 1000,
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "Cumulative model run time, us.",
        lambda s: s.compute_infer.ns // 1000,
    ),
    (
        "nv_inference_compute_output_duration_us",
        "Cumulative time reading outputs, us.",
        lambda s: s.compute_output.ns // 1000,
    ),
)
_TRITON_CACHE: tuple[tuple[str, str, Callable[[ModelStatistics], float]], ...] = (
    ("nv_cache_num_hits_per_model", "Requests the cache answered.", lambda s: s.cache_hit.count),
    ("nv_cache_num_misses_per_model", "Cache lookups that missed.", lambda s: s.cache_miss.count),
    (
        "nv_cache_hit_duration_per_model",
        "Cumulative lookup time of hits, us.",
        lambda s: s.cache_hit.ns // 1000,
    ),
    (
        "nv_cache_miss_duration_per_model",
        "Cumulative lookup time of misses, us.",
        lambda s: s.cache_miss.ns // 1000,
    ),
)


class _TritonCollector(Collector):
    """Triton's metric names and labels (model, version) over the gateway's statistics."""

    def __init__(self, source: VersionSource, queue_depth: Gauge, cache: bool) -> None:
        self._source = source
        self._queue_depth = queue_depth
        self._counters = _TRITON_COUNTERS + (_TRITON_CACHE if cache else ())

    def describe(self) -> Iterator[Metric]:
        return iter(())  # read at scrape time only

    def collect(self) -> Iterator[Metric]:
        versions = list(self._source())
        for name, documentation, read in self._counters:
            family = Metric(name, documentation, "unknown")
            for model, version, stats in versions:
                family.add_sample(name, {"model": model, "version": version}, float(read(stats)))
            yield family
        failures = Metric(
            "nv_inference_request_failure",
            "Failed requests by reason (REJECTED, CANCELED, BACKEND, OTHER).",
            "unknown",
        )
        for model, version, stats in versions:
            for reason in FAILURE_REASONS:
                labels = {"model": model, "reason": reason, "version": version}
                failures.add_sample(failures.name, labels, float(stats.failures.get(reason, 0)))
        yield failures
        pending = Metric(
            "nv_inference_pending_request_count",
            "Requests accepted and not yet executing (in the model's queue).",
            "gauge",
        )
        for family in self._queue_depth.collect():
            for sample in family.samples:
                labels = {"model": sample.labels["model"], "version": sample.labels["version"]}
                pending.add_sample(pending.name, labels, sample.value)
        yield pending


class _CoverageCollector(Collector):
    NAME = "gateway_feature_values"
    HELP = (
        "Raw feature values by model, version, contract version, feature and outcome: present, "
        "defaulted (null replaced by the contract default), out_of_range, oov."
    )
    LABELS = ("model", "version", "contract", "feature", "outcome")

    def __init__(self, source: CoverageSource) -> None:
        self._source = source

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.NAME, self.HELP, labels=self.LABELS)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.NAME, self.HELP, labels=self.LABELS)
        for model, version, contract, names, counts in self._source():
            for name, row in zip(names, counts.tolist(), strict=True):
                for outcome, value in zip(OUTCOMES, row, strict=True):
                    family.add_metric([model, version, contract, name, outcome], value)
        yield family


class _FunctionCounter(Collector):
    """A counter (or, with ``gauge``, a gauge) read from ``source`` at scrape time."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str],
        source: CounterSource,
        gauge: bool = False,
    ) -> None:
        self._name, self._doc, self._labels, self._source = name, documentation, labels, source
        self._family = GaugeMetricFamily if gauge else CounterMetricFamily

    def describe(self) -> Iterator[Metric]:
        yield self._family(self._name, self._doc, labels=self._labels)

    def collect(self) -> Iterator[Metric]:
        family = self._family(self._name, self._doc, labels=self._labels)
        for labels, value in self._source():
            family.add_metric(list(labels), value)
        yield family


class _Answered(Collector):
    """``gateway_requests_total`` (rpc, model, version, code) and
    ``gateway_request_duration_seconds`` (rpc, model, version), kept as lists of numbers the
    loop adds to and the scrape thread copies. At most ``_MAX_SERIES`` label sets: a model
    name is what the client sent, so past that the rest count under model ``(other)``."""

    def __init__(self) -> None:
        # (rpc, model, version, code) -> [count per latency bucket..., +Inf count, sum]
        self._series: dict[tuple[str, str, str, str], list[float]] = {}

    def add(self, rpc: str, model: str, version: str, code: str, seconds: float) -> None:
        key = (rpc, model, version, code)
        series = self._series.get(key)
        if series is None:
            if len(self._series) >= _MAX_SERIES:
                key = (rpc, _OTHER, "", code)
            series = self._series.setdefault(key, [0.0] * (len(_LATENCY_BUCKETS_S) + 2))
        series[bisect_left(_LATENCY_BUCKETS_S, seconds)] += 1
        series[-1] += seconds

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        return iter(self._families(self._series.copy()))

    @staticmethod
    def _families(
        series: dict[tuple[str, str, str, str], list[float]] | None = None,
    ) -> tuple[Metric, Metric]:
        requests = CounterMetricFamily(
            "gateway_requests",
            "OIP requests by RPC, model, version and gRPC status code.",
            labels=["rpc", "model", "version", "code"],
        )
        latency = HistogramMetricFamily(
            "gateway_request_duration_seconds",
            "Time from receiving an OIP request (the transport taking the call) to answering "
            "it: a wait for the event loop counts.",
            labels=["rpc", "model", "version"],
        )
        merged: dict[tuple[str, str, str], list[float]] = {}
        for key, values in (series or {}).items():
            values = list(values)  # a copy: the loop may add while this reads
            requests.add_metric(list(key), sum(values[:-1]))
            into = merged.setdefault(key[:3], [0.0] * len(values))
            for i, value in enumerate(values):
                into[i] += value
        for labels, values in merged.items():
            cumulative = list(accumulate(values[:-1]))
            bounds = [str(bound) for bound in _LATENCY_BUCKETS_S] + ["+Inf"]
            latency.add_metric(list(labels), list(zip(bounds, cumulative, strict=True)), values[-1])
        return requests, latency
