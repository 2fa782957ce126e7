"""Telemetry shared by every stage: tracing, metrics, logs."""

from gateway.telemetry.lag import LoopLag
from gateway.telemetry.logs import configure_logging
from gateway.telemetry.metrics import GatewayMetrics
from gateway.telemetry.tracing import Tracing

__all__ = ["GatewayMetrics", "LoopLag", "Tracing", "configure_logging"]
