"""The sidecar's Prometheus metrics: alerts firing, events stored."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

__all__ = ["SidecarMetrics"]


class SidecarMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.alerts = Gauge(
            "sidecar_alert_firing",
            "1 while an alert rule fires for a model version, segment and feature.",
            ["rule", "model", "version", "segment", "feature", "action"],
            registry=self.registry,
        )
        self.events = Counter(
            "sidecar_events",
            "Prediction events received: stored (new) or duplicate (already held).",
            ["outcome"],
            registry=self.registry,
        )

    def serve(self, host: str, port: int) -> int:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
