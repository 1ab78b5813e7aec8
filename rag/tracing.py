"""OpenTelemetry traces: a span per request and per job, and a child span per stage.

Off, and free, unless ``RAG_OTEL_ENDPOINT`` names an OTLP/HTTP collector (e.g. ``http://otel:4318``).
Spans are exported by the SDK's batch processor from its own thread, so exporting never blocks the
event loop; a collector that is down costs dropped spans, not requests. Each process has its own
tracer provider (held by the services, never installed globally), and the tracer of the current
request or job travels in a context variable, so stage code only says ``with span("rerank"):``.

The request id of the logs is the trace id of the request's span (32 hex digits), and an incoming W3C
``traceparent`` header makes the request's span a child of the caller's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Any

__all__ = ["Tracing", "span", "trace_id_of", "use_tracer"]

_TRACER: ContextVar[Any] = ContextVar("rag_tracer", default=None)


class Tracing:
    """The process's tracer provider and tracer, or nothing at all when no endpoint is set."""

    def __init__(self, endpoint: str = "", service_name: str = "rag", *, exporter: Any = None) -> None:
        self.provider = None
        self.tracer = None
        if not endpoint and exporter is None:
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces", timeout=5)
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
        self.tracer = self.provider.get_tracer("rag")

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    @contextmanager
    def root(self, name: str, headers: Mapping[str, str] | None = None, **attributes: Any) -> Iterator[Any]:
        """The span of a request (child of the caller's ``traceparent``) or a job; None when tracing is off."""
        if self.tracer is None:
            yield None
            return
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        parent = TraceContextTextMapPropagator().extract(dict(headers or {}))
        token = use_tracer(self.tracer)
        try:
            with self.tracer.start_as_current_span(name, context=parent, attributes=_clean(attributes)) as s:
                yield s
        finally:
            _TRACER.reset(token)

    def flush(self) -> None:
        if self.provider is not None:
            self.provider.force_flush(5000)

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


def use_tracer(tracer: Any) -> Token:
    return _TRACER.set(tracer)


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A child span of the current request's or job's span; nothing when tracing is off."""
    tracer = _TRACER.get()
    if tracer is None:
        yield None
        return
    with tracer.start_as_current_span(name, attributes=_clean(attributes)) as s:
        yield s


def trace_id_of(s: Any) -> str | None:
    """The span's trace id as 32 hex digits (the request id of the logs), or None."""
    if s is None:
        return None
    return format(s.get_span_context().trace_id, "032x")


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attributes.items() if isinstance(v, (str, bool, int, float))}
