"""OpenTelemetry tracing: one server span per RPC, continuing a caller's W3C ``traceparent``,
with a child span per stage of the request path (route, assemble, cache, queue, compute,
respond, record) and each batch run a span of its own linked to the requests in it; sampled
by trace id (``trace_sample_ratio``), following the caller's decision (``trace_parent_based``)."""

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
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.settings import TelemetrySettings

__all__ = ["Tracing"]

_PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    """A tracer of the gateway's own provider (no global state), or a no-op one when off."""

    def __init__(self, settings: TelemetrySettings, exporter: SpanExporter | None = None) -> None:
        """``exporter``: where spans go instead of the settings' (a test's in-memory one)."""
        self._provider: TracerProvider | None = None
        self.enabled = settings.tracing != "off" or exporter is not None
        if not self.enabled:
            self.tracer: trace.Tracer = trace.NoOpTracer()
            return
        sampler: Sampler = TraceIdRatioBased(settings.trace_sample_ratio)
        if settings.trace_parent_based:
            sampler = ParentBased(sampler)
        provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name}), sampler=sampler
        )
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        elif settings.tracing == "console":
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
