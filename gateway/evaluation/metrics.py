"""The sidecar's Prometheus metrics: alerts firing, events stored and waiting, store memory,
the broker's consumption, calls refused by its auth and reloads of its keys file, retraining
trigger runs and playbook actions."""

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
        self.not_enough_data = Gauge(
            "sidecar_alert_not_enough_data",
            "1 while a rule could not be checked on a model version and segment for want of "
            "data (rows, or labelled positives and negatives): not firing is not passing.",
            ["rule", "model", "version", "segment"],
            registry=self.registry,
        )
        self.events = Counter(
            "sidecar_events",
            "Prediction events received: stored (new) or duplicate (already held).",
            ["outcome"],
            registry=self.registry,
        )
        self.pending = Gauge(
            "sidecar_pending_events",
            "Events read from the publishers' streams and not yet stored "
            "(bounded by evaluation.max_pending_events).",
            registry=self.registry,
        )
        self.full = Counter(
            "sidecar_pending_full",
            "Times a stream stopped reading because max_pending_events events waited to be "
            "stored (back-pressure: the publisher keeps the rest in its log).",
            registry=self.registry,
        )
        self.store_memory = Gauge(
            "sidecar_store_memory_bytes",
            "Memory DuckDB holds (its buffer pool: table blocks, indexes, query state), "
            "bounded by evaluation.store_memory_limit_bytes.",
            registry=self.registry,
        )
        self.broker_connected = Gauge(
            "sidecar_broker_connected",
            "1 while the sidecar consumes the broker (evaluation.broker), else 0.",
            registry=self.registry,
        )
        self.broker_batches = Counter(
            "sidecar_broker_batches",
            "Batches consumed from the broker: stored (and acknowledged), malformed (no "
            "EventBatch: acknowledged and skipped).",
            ["outcome"],
            registry=self.registry,
        )
        self.broker_backlog = Gauge(
            "sidecar_broker_backlog",
            "Batches in the broker partitions this sidecar owns, not yet stored and deleted "
            "(read each second).",
            registry=self.registry,
        )
        self.broker_claimed = Counter(
            "sidecar_broker_claimed",
            "Batches taken over from another consumer of the group that left them "
            "unacknowledged for evaluation.broker.claim_idle_s.",
            registry=self.registry,
        )

        self.refused = Counter(
            "sidecar_auth_refused",
            "Calls refused by evaluation.auth, by RPC and reason: missing (no credential), "
            "unknown (not in the keys file), expired, role (lacks the RPC's role).",
            ["rpc", "reason"],
            registry=self.registry,
        )
        self.key_reloads = Counter(
            "sidecar_keys_reloads",
            "Reads of evaluation.auth.keys_file after it changed: loaded, or failed (the keys "
            "read before stay in use).",
            ["outcome"],
            registry=self.registry,
        )

        self.triggers = Counter(
            "sidecar_triggers",
            "Retraining trigger runs (evaluation.triggers) by model, kind (time, data, drift, "
            "performance, manual) and outcome (ok, failed, timeout, error; skipped: an "
            "incident refused for a run in progress or a cooldown; too_few_rows: an export "
            "under min_rows, nothing trained).",
            ["model", "kind", "outcome"],
            registry=self.registry,
        )
        self.playbook_actions = Counter(
            "sidecar_playbook_actions",
            "Playbook actions taken on alerts (evaluation.playbooks) by model, action and "
            "outcome (queued, ok, failed, recorded, skipped).",
            ["model", "action", "outcome"],
            registry=self.registry,
        )

    def serve(self, host: str, port: int) -> int:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
