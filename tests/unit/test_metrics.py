"""Answered requests are counted in plain numbers and read at scrape time: the exposition is
what prometheus_client's own Counter and Histogram would write, and the label sets a client
can create (its model names) are bounded."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.telemetry import GatewayMetrics, LoopLag
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


def test_loop_lag_rises_at_once_and_falls_back_with_its_half_life():
    lag = LoopLag(interval_s=0.01, half_life_s=0.25)
    assert lag() == 0.0
    lag.observe(0.6, 0.61)  # one tick 600 ms late: seen at once
    assert lag() == 0.6
    lag.observe(0.0, 0.25)  # on time for one half-life: half of it is left
    assert lag() == pytest.approx(0.3)
    for _ in range(25):
        lag.observe(0.0, 0.01)
    assert lag() == pytest.approx(0.15)  # another half-life, in ticks
    lag.observe(0.2, 0.21)
    assert lag() == 0.2
