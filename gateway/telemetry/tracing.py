"""OpenTelemetry tracing: one server span per RPC, continuing a caller's W3C ``traceparent``."""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.settings import TelemetrySettings

__all__ = ["Tracing"]

_PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    """A tracer of the gateway's own provider (no global state), or a no-op one when off."""

    def __init__(self, settings: TelemetrySettings) -> None:
        self._provider: TracerProvider | None = None
        self.enabled = settings.tracing != "off"
        if not self.enabled:
            self.tracer: trace.Tracer = trace.NoOpTracer()
            return
        provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}))
        if settings.tracing == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint))
            )
        self._provider = provider
        self.tracer = provider.get_tracer("gateway")

    @staticmethod
    def extract(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context:
        """The caller's trace context from gRPC metadata (``traceparent``/``tracestate``)."""
        carrier = {
            key: value
            for key, value in metadata or ()
            if key in ("traceparent", "tracestate") and isinstance(value, str)
        }
        return _PROPAGATOR.extract(carrier)

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()
