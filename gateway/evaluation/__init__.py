"""The evaluation sidecar: its own process. It stores prediction events exactly once (DuckDB),
joins labels, measures drift, coverage and per-segment quality, and judges canaries.

It imports only the event schema and settings, never the gateway's request path."""

from gateway.evaluation.store import EventStore

__all__ = ["EventStore"]
