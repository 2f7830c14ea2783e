"""Prometheus metrics (``prometheus_client``), turned on by the ``metrics`` setting.

Imported only when ``metrics`` is on: ``pip install 'dpop-middleware[prometheus]'``. The metrics
live on one registry (the default one, or ``{"registry": ...}``); one set per registry, shared
by every middleware in the process, so two apps (or two ``Settings``) never register twice.

Labels hold stable codes only (:class:`~dpop_middleware.observe.ReasonLabels` bounds the
reasons), so the number of series is bounded; never a token, key, path or client address.

Several worker processes (gunicorn, ``uvicorn --workers``): set ``PROMETHEUS_MULTIPROC_DIR`` to
an empty directory before the workers start, and serve ``/metrics`` through
``prometheus_client.multiprocess.MultiProcessCollector`` (:func:`metrics_registry` does).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from dpop_middleware.observe import (
    BaseObserver,
    FetchKind,
    FetchResult,
    ReasonLabels,
    RequestEvent,
)

#: The middleware's own time: a warm DPoP check is ~0.1 ms; a cold one or a Redis call ~1 ms.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
#: ``iat`` minus the server clock, seconds: negative is a proof's age (or a slow client clock),
#: positive a client clock ahead. Sized for the ``clock_skew`` (10 s) and ``proof_max_age``
#: (60 s) defaults.
IAT_OFFSET_BUCKETS = (
    -300.0, -60.0, -30.0, -10.0, -5.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
    60.0, 300.0,
)  # fmt: skip


class PrometheusObserver(BaseObserver):
    """The metrics of ``docs/observability.md``; build it with :func:`prometheus_observer`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "dpop_requests",
            "Requests the DPoP middleware handled, by outcome "
            "(accepted|refused|passed|would_refuse|error), reason code and status",
            ("outcome", "reason", "status"),
            registry=registry,
        )
        self.verify_seconds = Histogram(
            "dpop_verify_seconds",
            "The DPoP middleware's own time per request (not the application's)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.replay_store_seconds = Histogram(
            "dpop_replay_store_seconds",
            "Time of one replay-store call (record a jti)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.replay_store_errors = Counter(
            "dpop_replay_store_errors",
            "Replay-store calls that failed (the request is refused with 503)",
            ("store",),
            registry=registry,
        )
        self.jwks_fetch = Counter(
            "dpop_jwks_fetch", "Fetches of the issuer's JWK Set, by result", ("result",),
            registry=registry,
        )  # fmt: skip
        self.metadata_fetch = Counter(
            "dpop_metadata_fetch", "Fetches of authorization server metadata, by result",
            ("result",), registry=registry,
        )  # fmt: skip
        self.introspection = Counter(
            "dpop_introspection", "Token introspection calls, by result", ("result",),
            registry=registry,
        )  # fmt: skip
        self.introspection_cache_total = Counter(
            "dpop_introspection_cache", "Introspection answers from the cache (hit) or not (miss)",
            ("result",), registry=registry,
        )  # fmt: skip
        self.nonce_issued = Counter(
            "dpop_nonce_issued", "Fresh DPoP-Nonce values sent to clients", registry=registry
        )
        self.iat_offset = Histogram(
            "dpop_proof_iat_offset_seconds",
            "Accepted proofs: iat minus the server clock (client clock skew plus proof age)",
            buckets=IAT_OFFSET_BUCKETS,
            registry=registry,
        )
        self._reasons = ReasonLabels()
        # One labelled child per label set, looked up in a dict: ``labels()`` costs ~1 us.
        self._children: dict[tuple[str, str, int], Any] = {}
        self._fetches: dict[str, Counter] = {
            "jwks": self.jwks_fetch,
            "metadata": self.metadata_fetch,
            "introspection": self.introspection,
        }
        self._verify = self.verify_seconds.observe
        self._store = self.replay_store_seconds.observe
        self._iat = self.iat_offset.observe
        self._nonce: Callable[[], None] = self.nonce_issued.inc
        for outcome in ("accepted", "passed"):  # the usual series exist from the start (0)
            self._child(outcome, "", 0)
        for result in ("ok", "error", "invalid"):
            for counter in self._fetches.values():
                counter.labels(result=result)
        for hit in ("hit", "miss"):
            self.introspection_cache_total.labels(result=hit)

    def _child(self, outcome: str, reason: str, status: int) -> Any:
        child = self.requests.labels(
            outcome=outcome, reason=self._reasons(reason), status=str(status) if status else ""
        )
        self._children[outcome, reason, status] = child
        return child

    def request_finished(self, handle: Any, event: RequestEvent) -> None:
        child = self._children.get((event.outcome, event.reason, event.status))
        if child is None:
            child = self._child(event.outcome, event.reason, event.status)
        child.inc()
        self._verify(event.seconds)
        if event.iat_offset is not None:
            self._iat(event.iat_offset)
        if event.nonce_issued:
            self._nonce()

    def replay_store_finished(
        self, handle: Any, store: str, seconds: float, error: BaseException | None
    ) -> None:
        self._store(seconds)
        if error is not None:
            self.replay_store_errors.labels(store=store).inc()

    def fetch_finished(self, handle: Any, kind: FetchKind, result: FetchResult) -> None:
        self._fetches[kind].labels(result=result).inc()

    def introspection_cache(self, hit: bool) -> None:
        self.introspection_cache_total.labels(result="hit" if hit else "miss").inc()


_LOCK = threading.Lock()
_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, PrometheusObserver] = (
    weakref.WeakKeyDictionary()
)


def prometheus_observer(registry: CollectorRegistry | None = None) -> PrometheusObserver:
    """The metrics on ``registry`` (default: ``prometheus_client.REGISTRY``), made once."""
    registry = REGISTRY if registry is None else registry
    with _LOCK:
        observer = _BY_REGISTRY.get(registry)
        if observer is None:
            observer = _BY_REGISTRY[registry] = PrometheusObserver(registry)
        return observer


def metrics_registry() -> CollectorRegistry:
    """The registry to expose at ``/metrics``: with ``PROMETHEUS_MULTIPROC_DIR`` set (several
    worker processes), a new registry whose collector reads every worker's files at each scrape;
    else the default registry. Call it once, at start-up."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


__all__ = [
    "IAT_OFFSET_BUCKETS",
    "LATENCY_BUCKETS",
    "PrometheusObserver",
    "metrics_registry",
    "prometheus_observer",
]
