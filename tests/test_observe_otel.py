"""OpenTelemetry spans (dpop_middleware.otel) with the SDK's in-memory exporter: the span tree,
its attributes, that no token, proof or key reaches the exported data, and that the
application's own spans keep the request's trace and parent."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from observe_support import KINDS, Api
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_frameworks_support import dpop_headers

from dpop_middleware.errors import ConfigurationError
from dpop_middleware.settings import Settings
from dpop_middleware.testing import DPoPKey, TokenIssuer


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def spans(exporter: InMemorySpanExporter) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        out.setdefault(span.name, []).append(span)
    return out


def exported_text(exporter: InMemorySpanExporter) -> str:
    return "\n".join(span.to_json() for span in exporter.get_finished_spans())


def assert_no_secret(exporter: InMemorySpanExporter, *secrets: str) -> None:
    text = exported_text(exporter)
    for secret in secrets:
        for part in secret.split("."):  # not even one segment of a JWS
            assert part not in text


@pytest.mark.parametrize("kind", KINDS)
def test_accepted_request_spans(
    kind: str,
    exporter: InMemorySpanExporter,
    provider: TracerProvider,
    make_settings: Callable[..., dict[str, Any]],
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
) -> None:
    api = Api(kind, make_settings(tracing={"tracer_provider": provider}))
    token = issuer.token(bound_to=dpop_key, claims={"email": "alice@example.com"})
    headers = dpop_headers(dpop_key, token, "GET", f"{api.base}/me")
    assert api.get("/me", headers) == 200
    found = spans(exporter)
    (verify,) = found["dpop.verify"]
    (store,) = found["dpop.replay_store"]
    assert store.parent is not None and store.parent.span_id == verify.context.span_id
    attributes = dict(verify.attributes or {})
    duration = attributes.pop("dpop.replay_store.duration")
    assert isinstance(duration, float) and 0 < duration < 1
    assert attributes == {"dpop.outcome": "accepted", "dpop.scheme": "DPoP", "dpop.jkt": dpop_key.jkt}
    assert dict(store.attributes or {}) == {"dpop.replay_store.backend": "memory"}
    jwk = dpop_key.private_jwk
    assert_no_secret(exporter, token, headers[1][1], jwk["x"], jwk["y"], jwk["d"])
    assert "alice@example.com" not in exported_text(exporter)
    assert "user-123" not in exported_text(exporter)  # the sub claim


@pytest.mark.parametrize("kind", KINDS)
def test_refused_and_passed_request_spans(
    kind: str,
    exporter: InMemorySpanExporter,
    provider: TracerProvider,
    make_settings: Callable[..., dict[str, Any]],
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
) -> None:
    settings = make_settings(tracing={"tracer_provider": provider}, exclude_paths=["/health"])
    api = Api(kind, settings)
    token = issuer.token(bound_to=dpop_key)
    headers = dpop_headers(dpop_key, token, "POST", f"{api.base}/me")
    assert api.get("/me", headers) == 401
    assert api.get("/health") == 200
    refused, passed = spans(exporter)["dpop.verify"]
    assert dict(refused.attributes or {}) == {
        "dpop.outcome": "refused", "dpop.reason": "htm_mismatch", "dpop.status": 401
    }  # fmt: skip
    assert dict(passed.attributes or {}) == {"dpop.outcome": "passed"}
    assert "dpop.replay_store" not in spans(exporter)
    assert_no_secret(exporter, token, headers[1][1])


@pytest.mark.parametrize("kind", KINDS)
def test_store_down_marks_the_spans_as_errors(
    kind: str,
    exporter: InMemorySpanExporter,
    provider: TracerProvider,
    make_settings: Callable[..., dict[str, Any]],
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
) -> None:
    api = Api(kind, make_settings(tracing={"tracer_provider": provider}), store_down=True)
    token = issuer.token(bound_to=dpop_key)
    assert api.get("/me", dpop_headers(dpop_key, token, "GET", f"{api.base}/me")) == 503
    found = spans(exporter)
    (verify,), (store,) = found["dpop.verify"], found["dpop.replay_store"]
    assert verify.status.status_code == trace.StatusCode.ERROR
    assert verify.attributes is not None
    assert verify.attributes["dpop.reason"] == "replay_store_unavailable"
    assert store.status.status_code == trace.StatusCode.ERROR
    assert store.status.description == "ReplayStoreError"  # the type, never the message


@pytest.mark.parametrize("kind", KINDS)
def test_the_jwks_fetch_is_a_child_span(
    kind: str,
    exporter: InMemorySpanExporter,
    provider: TracerProvider,
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
) -> None:
    with issuer.serve(clients={}) as server:
        settings = server.settings(tracing={"tracer_provider": provider}, clock=issuer.clock)
        api = Api(kind, settings)
        token = issuer.token(bound_to=dpop_key)
        assert api.get("/me", dpop_headers(dpop_key, token, "GET", f"{api.base}/me")) == 200
    found = spans(exporter)
    (verify,), (fetch,) = found["dpop.verify"], found["dpop.jwks_fetch"]
    assert fetch.parent is not None and fetch.parent.span_id == verify.context.span_id
    assert dict(fetch.attributes or {}) == {"dpop.fetch.result": "ok"}


def server_span_asgi(provider: TracerProvider) -> Callable[[Any], Any]:
    """An ASGI wrapper that starts a server span around the middleware, as instrumentation
    would."""
    tracer = provider.get_tracer("test")

    def wrap(app: Any) -> Any:
        async def wrapped(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            with tracer.start_as_current_span("http.server", kind=trace.SpanKind.SERVER):
                await app(scope, receive, send)

        return wrapped

    return wrap


def server_span_wsgi(provider: TracerProvider) -> Callable[[Any], Any]:
    tracer = provider.get_tracer("test")

    def wrap(app: Any) -> Any:
        def wrapped(environ: Any, start_response: Any) -> Any:
            with tracer.start_as_current_span("http.server", kind=trace.SpanKind.SERVER):
                return list(app(environ, start_response))

        return wrapped

    return wrap


@pytest.mark.parametrize("kind", KINDS)
def test_the_apps_spans_keep_the_request_trace_and_parent(
    kind: str,
    exporter: InMemorySpanExporter,
    provider: TracerProvider,
    make_settings: Callable[..., dict[str, Any]],
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
) -> None:
    app_tracer = provider.get_tracer("app")

    def inner() -> None:
        with app_tracer.start_as_current_span("app.work"):
            pass

    wrap = (server_span_asgi if kind == "asgi" else server_span_wsgi)(provider)
    api = Api(kind, make_settings(tracing={"tracer_provider": provider}), inner=inner, wrap=wrap)
    token = issuer.token(bound_to=dpop_key)
    assert api.get("/me", dpop_headers(dpop_key, token, "GET", f"{api.base}/me")) == 200
    found = spans(exporter)
    (server,), (verify,), (work,) = found["http.server"], found["dpop.verify"], found["app.work"]
    trace_id = server.context.trace_id
    assert verify.context.trace_id == work.context.trace_id == trace_id
    assert verify.parent is not None and verify.parent.span_id == server.context.span_id
    # The app runs after dpop.verify ended: its spans hang off the server span, not ours.
    assert work.parent is not None and work.parent.span_id == server.context.span_id
    assert verify.end_time is not None and work.start_time is not None
    assert verify.end_time <= work.start_time


def test_tracing_true_uses_the_global_provider_and_works_without_an_sdk(
    make_settings: Callable[..., dict[str, Any]], issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    api = Api("asgi", make_settings(tracing=True))  # no SDK installed globally: no-op spans
    token = issuer.token(bound_to=dpop_key)
    assert api.get("/me", dpop_headers(dpop_key, token, "GET", f"{api.base}/me")) == 200
    assert api.get("/me") == 401


def test_a_provider_that_is_not_one_is_refused(make_settings: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"setting 'tracing\.tracer_provider'"):
        Settings.from_dict(make_settings(tracing={"tracer_provider": 3}))


@pytest.mark.parametrize("kind", KINDS)
def test_metrics_and_tracing_together(
    kind: str,
    exporter: InMemorySpanExporter,
    provider: TracerProvider,
    make_settings: Callable[..., dict[str, Any]],
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
) -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    settings = make_settings(tracing={"tracer_provider": provider}, metrics={"registry": registry})
    api = Api(kind, settings)
    token = issuer.token(bound_to=dpop_key)
    assert api.get("/me", dpop_headers(dpop_key, token, "GET", f"{api.base}/me")) == 200
    assert api.get("/me") == 401
    labels = {"outcome": "accepted", "reason": "", "status": ""}
    assert registry.get_sample_value("dpop_requests_total", labels) == 1
    assert registry.get_sample_value("dpop_replay_store_seconds_count") == 1
    found = spans(exporter)
    assert len(found["dpop.verify"]) == 2 and len(found["dpop.replay_store"]) == 1
