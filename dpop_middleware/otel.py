"""OpenTelemetry tracing (``opentelemetry-api``), turned on by the ``tracing`` setting.

Imported only when ``tracing`` is on: ``pip install 'dpop-middleware[otel]'`` (and an SDK with
an exporter, configured by the application as usual).

One ``dpop.verify`` span per request the middleware runs, a child of whatever span is current
(a server span from the framework's instrumentation, say), with children for the replay store
(``dpop.replay_store``) and any fetch (``dpop.jwks_fetch``, ``dpop.metadata_fetch``,
``dpop.introspection``). The span is current while the middleware works (a Redis
instrumentation's spans nest under ``dpop.replay_store``) and ends before the application runs:
it times the middleware, and the application's spans keep their parent and trace.

Attributes are codes, statuses, durations and the proof key's thumbprint (public by design):
never a token, proof, key or claim value, and no exception message.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider

from dpop_middleware.observe import BaseObserver, FetchKind, FetchResult, RequestEvent

_FETCH_SPANS: dict[str, str] = {
    "jwks": "dpop.jwks_fetch",
    "metadata": "dpop.metadata_fetch",
    "introspection": "dpop.introspection",
}


class TracingObserver(BaseObserver):
    """Spans for the Engine's work; ``provider`` None means the global tracer provider."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        # With the global provider, a ProxyTracer: an SDK installed later is still used.
        self._tracer = trace.get_tracer("dpop_middleware", tracer_provider=provider)

    def _start(self, name: str) -> tuple[Span, Any]:
        span = self._tracer.start_span(name, kind=SpanKind.INTERNAL)
        if not span.is_recording():  # a no-op provider, or sampled out: nothing to nest under it
            return span, None
        return span, context.attach(trace.set_span_in_context(span))

    @staticmethod
    def _end(handle: tuple[Span, Any]) -> None:
        span, token = handle
        if token is not None:
            context.detach(token)
        span.end()

    def request_started(self) -> Any:
        return self._start("dpop.verify")

    def request_finished(self, handle: Any, event: RequestEvent) -> None:
        span: Span = handle[0]
        if span.is_recording():
            span.set_attribute("dpop.outcome", event.outcome)
            if event.reason:
                span.set_attribute("dpop.reason", event.reason)
            if event.status:
                span.set_attribute("dpop.status", event.status)
            if event.scheme:
                span.set_attribute("dpop.scheme", event.scheme)
            if event.jkt is not None:
                span.set_attribute("dpop.jkt", event.jkt)  # RFC 7638 thumbprint: public
            if event.status >= 500 or event.outcome == "error":
                span.set_status(Status(StatusCode.ERROR, event.reason or event.outcome))
        self._end(handle)

    def replay_store_started(self) -> Any:
        return self._start("dpop.replay_store")

    def replay_store_finished(
        self, handle: Any, store: str, seconds: float, error: BaseException | None
    ) -> None:
        span: Span = handle[0]
        span.set_attribute("dpop.replay_store.backend", store)
        if error is not None:  # the type only: a message could carry anything
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        self._end(handle)
        # Now the dpop.verify span is current again.
        trace.get_current_span().set_attribute("dpop.replay_store.duration", seconds)

    def fetch_started(self, kind: FetchKind) -> Any:
        return self._start(_FETCH_SPANS[kind])

    def fetch_finished(self, handle: Any, kind: FetchKind, result: FetchResult) -> None:
        span: Span = handle[0]
        span.set_attribute("dpop.fetch.result", result)
        if result != "ok":
            span.set_status(Status(StatusCode.ERROR, result))
        self._end(handle)

    def introspection_cache(self, hit: bool) -> None:
        trace.get_current_span().set_attribute("dpop.introspection.cache", "hit" if hit else "miss")


__all__ = ["TracingObserver"]
