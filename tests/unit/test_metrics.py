"""Answered requests are counted in plain numbers and read at scrape time: the exposition is
what prometheus_client's own Counter and Histogram would write, and the label sets a client
can create (its model names) are bounded."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.telemetry import GatewayMetrics
from gateway.telemetry import metrics as metrics_module


def samples(registry: CollectorRegistry, prefix: str) -> dict[tuple[str, frozenset], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith(prefix)
    }


def test_the_histogram_reads_as_prometheus_clients_own():
    durations = [0.00005, 0.0001, 0.0003, 0.0003, 0.07, 2.0, 30.0]
    metrics = GatewayMetrics()
    reference = CollectorRegistry()
    histogram = Histogram(
        "gateway_request_duration_seconds",
        "",
        ["rpc", "model", "version"],
        buckets=metrics_module._LATENCY_BUCKETS_S,
        registry=reference,
    )
    for seconds in durations:
        metrics.observe("ModelInfer", "m", "1", "OK", seconds)
        histogram.labels("ModelInfer", "m", "1").observe(seconds)
    metrics.observe("ModelInfer", "m", "1", "NOT_FOUND", 0.5)  # one more, another code
    histogram.labels("ModelInfer", "m", "1").observe(0.5)
    ours = samples(metrics.registry, "gateway_request_duration_seconds")
    theirs = samples(reference, "gateway_request_duration_seconds")
    assert ours.keys() == {k for k in theirs if not k[0].endswith("_created")}
    for key, value in ours.items():
        assert value == theirs[key], key
    counts = samples(metrics.registry, "gateway_requests_total")
    assert counts[
        (
            "gateway_requests_total",
            frozenset({"rpc": "ModelInfer", "model": "m", "version": "1", "code": "OK"}.items()),
        )
    ] == len(durations)


def test_label_sets_from_client_names_are_bounded(monkeypatch):
    monkeypatch.setattr(metrics_module, "_MAX_SERIES", 3)
    metrics = GatewayMetrics()
    for i in range(10):
        metrics.observe("ModelInfer", f"nope-{i}", "", "NOT_FOUND", 0.001)
    counts = samples(metrics.registry, "gateway_requests_total")
    models = sorted(dict(labels)["model"] for _, labels in counts)
    assert models == ["(other)", "nope-0", "nope-1", "nope-2"]
    assert sum(counts.values()) == 10
