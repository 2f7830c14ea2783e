"""Prometheus metrics (``prometheus_client``), turned on by the ``metrics`` setting.

Imported only when ``metrics`` is on: ``pip install 'dpop-middleware[prometheus]'``. The metrics
live on one registry (the default one, or ``{"registry": ...}``); one set per registry, shared
by every middleware in the process, so two apps (or two ``Settings``) never register twice.

Labels hold stable codes only (:class:`~dpop_middleware.observe.ReasonLabels` bounds the
reasons), so the number of series is bounded; never a token, key, path or client address.

One process: :class:`PrometheusObserver`, a collector of its own (one lock per request, about
1 us). Several worker processes (gunicorn, ``uvicorn --workers``): set
``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before the workers start; the metrics are then
``prometheus_client`` objects (:class:`MultiProcessObserver`, which that mode aggregates across
processes), and ``/metrics`` reads every worker's files (:func:`metrics_registry`).
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample

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


_REQUESTS_HELP = (
    "Requests the DPoP middleware handled, by outcome (accepted|refused|passed|would_refuse|error), "
    "reason code and status"
)
_VERIFY_HELP = "The DPoP middleware's own time per request (not the application's)"
_STORE_HELP = "Time of one replay-store call (record a jti)"
_STORE_ERRORS_HELP = "Replay-store calls that failed (the request is refused with 503)"
_FETCH_HELP = {
    "jwks": ("dpop_jwks_fetch", "Fetches of the issuer's JWK Set, by result"),
    "metadata": ("dpop_metadata_fetch", "Fetches of authorization server metadata, by result"),
    "introspection": ("dpop_introspection", "Token introspection calls, by result"),
}
_CACHE_HELP = "Introspection answers from the cache (hit) or not (miss)"
_NONCE_HELP = "Fresh DPoP-Nonce values sent to clients"
_IAT_HELP = "Accepted proofs: iat minus the server clock (client clock skew plus proof age)"
_FETCH_RESULTS = ("ok", "error", "invalid")


#: Queued events counted in one go (a few hundred kB at most).
BATCH = 1024


class _Buckets:
    """One histogram's counts, kept by :class:`PrometheusObserver` under its lock."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: +Inf
        self.total = 0.0

    def add(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        running, buckets = 0, []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), float(running)))
        family = HistogramMetricFamily(name, documentation)
        family.add_metric([], buckets, self.total)
        if self.bounds[0] < 0:  # no _sum with buckets below zero (OpenMetrics), but a _count
            family.samples.append(Sample(name + "_count", {}, float(running), None, None))
        return family


class PrometheusObserver(BaseObserver):
    """The metrics of ``docs/observability.md`` in one process; build it with
    :func:`prometheus_observer`.

    A collector of its own: a request appends its event to a queue (atomic, no lock); the
    queue is counted every ``BATCH`` events and at each scrape, so a scrape is always exact.
    ``prometheus_client``'s metric objects take a lock per counter and per histogram: about
    4 us for the four a request touches, well over this path's budget of 3 us (measured in
    place, with the signature checks around it). Several processes: see
    :class:`MultiProcessObserver`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._lock = threading.Lock()  # the counts
        self._drain_lock = threading.Lock()  # one drainer at a time
        self._pending: deque[RequestEvent] = deque()
        self._reasons = ReasonLabels()
        self._labels: dict[tuple[str, str, int], tuple[str, str, str]] = {}
        self._requests: dict[tuple[str, str, str], int] = {
            ("accepted", "", ""): 0,
            ("passed", "", ""): 0,
        }
        self._verify = _Buckets(LATENCY_BUCKETS)
        self._store = _Buckets(LATENCY_BUCKETS)
        self._iat = _Buckets(IAT_OFFSET_BUCKETS)
        self._store_errors: dict[str, int] = {}
        self._fetches = {kind: dict.fromkeys(_FETCH_RESULTS, 0) for kind in _FETCH_HELP}
        self._cache = {"hit": 0, "miss": 0}
        self._nonces = 0
        registry.register(self)

    def describe(self) -> list[Metric]:
        return []  # nothing to check against other collectors' names ahead of time

    def collect(self) -> Iterator[Metric]:
        self._drain(blocking=True)
        with self._lock:
            requests = CounterMetricFamily(
                "dpop_requests", _REQUESTS_HELP, labels=("outcome", "reason", "status")
            )
            for labels, count in self._requests.items():
                requests.add_metric(labels, count)
            errors = CounterMetricFamily(
                "dpop_replay_store_errors", _STORE_ERRORS_HELP, labels=("store",)
            )
            for store, count in self._store_errors.items():
                errors.add_metric((store,), count)
            fetches = []
            for kind, (name, documentation) in _FETCH_HELP.items():
                family = CounterMetricFamily(name, documentation, labels=("result",))
                for result, count in self._fetches[kind].items():
                    family.add_metric((result,), count)
                fetches.append(family)
            cache = CounterMetricFamily("dpop_introspection_cache", _CACHE_HELP, labels=("result",))
            for result, count in self._cache.items():
                cache.add_metric((result,), count)
            out: list[Metric] = [
                requests,
                self._verify.family("dpop_verify_seconds", _VERIFY_HELP),
                self._store.family("dpop_replay_store_seconds", _STORE_HELP),
                errors,
                *fetches,
                cache,
                CounterMetricFamily("dpop_nonce_issued", _NONCE_HELP, value=self._nonces),
                self._iat.family("dpop_proof_iat_offset_seconds", _IAT_HELP),
            ]
        yield from out

    def _label(self, key: tuple[str, str, int]) -> tuple[str, str, str]:
        outcome, reason, status = key
        label = (outcome, self._reasons(reason), str(status) if status else "")
        if len(self._labels) < 1000:  # bounded, like the labels themselves
            self._labels[key] = label
        return label

    def request_finished(self, handle: Any, event: RequestEvent) -> None:
        """The one call a request makes: queue the event (``deque.append`` is atomic, no lock);
        every ``BATCH`` events, or at a scrape, they are counted in one go."""
        pending = self._pending
        pending.append(event)
        if len(pending) >= BATCH:
            self._drain(blocking=False)

    def _drain(self, *, blocking: bool) -> None:
        """Count the queued events. One drainer at a time; a request that finds another one
        draining goes on (its event is counted by that one or the next)."""
        if not self._drain_lock.acquire(blocking):
            return
        try:
            pending = self._pending
            with self._lock:
                while pending:
                    self._count(pending.popleft())
        finally:
            self._drain_lock.release()

    def _count(self, event: RequestEvent) -> None:
        key = (event.outcome, event.reason, event.status)
        label = self._labels.get(key) or self._label(key)
        requests = self._requests
        requests[label] = requests.get(label, 0) + 1
        self._verify.add(event.seconds)
        store_seconds = event.store_seconds
        if store_seconds is not None:
            self._store.add(store_seconds)
            if event.store_error:
                errors = self._store_errors
                errors[event.store] = errors.get(event.store, 0) + 1
        if event.iat_offset is not None:
            self._iat.add(event.iat_offset)
        if event.nonce_issued:
            self._nonces += 1

    def fetch_finished(self, handle: Any, kind: FetchKind, result: FetchResult) -> None:
        with self._lock:
            self._fetches[kind][result] += 1

    def introspection_cache(self, hit: bool) -> None:
        with self._lock:
            self._cache["hit" if hit else "miss"] += 1


class MultiProcessObserver(BaseObserver):
    """The same metrics as :class:`PrometheusObserver`, as ``prometheus_client`` metric objects:
    what its multi-process mode (``PROMETHEUS_MULTIPROC_DIR``) aggregates across workers.
    Chosen by :func:`prometheus_observer` when that variable is set; about 4 us a request."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "dpop_requests", _REQUESTS_HELP, ("outcome", "reason", "status"), registry=registry
        )
        self.verify_seconds = Histogram(
            "dpop_verify_seconds", _VERIFY_HELP, buckets=LATENCY_BUCKETS, registry=registry
        )
        self.replay_store_seconds = Histogram(
            "dpop_replay_store_seconds", _STORE_HELP, buckets=LATENCY_BUCKETS, registry=registry
        )
        self.replay_store_errors = Counter(
            "dpop_replay_store_errors", _STORE_ERRORS_HELP, ("store",), registry=registry
        )
        self._fetches = {
            kind: Counter(name, documentation, ("result",), registry=registry)
            for kind, (name, documentation) in _FETCH_HELP.items()
        }
        self.cache = Counter(
            "dpop_introspection_cache", _CACHE_HELP, ("result",), registry=registry
        )
        self.nonce_issued = Counter("dpop_nonce_issued", _NONCE_HELP, registry=registry)
        self.iat_offset = Histogram(
            "dpop_proof_iat_offset_seconds", _IAT_HELP, buckets=IAT_OFFSET_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self._reasons = ReasonLabels()
        # One labelled child per label set, looked up in a dict: ``labels()`` costs ~1 us.
        self._children: dict[tuple[str, str, int], Any] = {}
        for outcome in ("accepted", "passed"):  # the usual series exist from the start (0)
            self._child((outcome, "", 0))
        for counter in self._fetches.values():
            for result in _FETCH_RESULTS:
                counter.labels(result=result)
        for hit in ("hit", "miss"):
            self.cache.labels(result=hit)

    def _child(self, key: tuple[str, str, int]) -> Any:
        outcome, reason, status = key
        child = self.requests.labels(
            outcome=outcome, reason=self._reasons(reason), status=str(status) if status else ""
        )
        if len(self._children) < 1000:
            self._children[key] = child
        return child

    def request_finished(self, handle: Any, event: RequestEvent) -> None:
        key = (event.outcome, event.reason, event.status)
        (self._children.get(key) or self._child(key)).inc()
        self.verify_seconds.observe(event.seconds)
        if event.store_seconds is not None:
            self.replay_store_seconds.observe(event.store_seconds)
            if event.store_error:
                self.replay_store_errors.labels(store=event.store).inc()
        if event.iat_offset is not None:
            self.iat_offset.observe(event.iat_offset)
        if event.nonce_issued:
            self.nonce_issued.inc()

    def fetch_finished(self, handle: Any, kind: FetchKind, result: FetchResult) -> None:
        self._fetches[kind].labels(result=result).inc()

    def introspection_cache(self, hit: bool) -> None:
        self.cache.labels(result="hit" if hit else "miss").inc()


_LOCK = threading.Lock()
_BY_REGISTRY: weakref.WeakKeyDictionary[
    CollectorRegistry, PrometheusObserver | MultiProcessObserver
] = weakref.WeakKeyDictionary()


def prometheus_observer(
    registry: CollectorRegistry | None = None,
) -> PrometheusObserver | MultiProcessObserver:
    """The metrics on ``registry`` (default: ``prometheus_client.REGISTRY``), made once per
    registry: :class:`MultiProcessObserver` when ``PROMETHEUS_MULTIPROC_DIR`` is set, else
    :class:`PrometheusObserver`."""
    registry = REGISTRY if registry is None else registry
    with _LOCK:
        observer = _BY_REGISTRY.get(registry)
        if observer is None:
            kind = MultiProcessObserver if _multiprocess() else PrometheusObserver
            observer = _BY_REGISTRY[registry] = kind(registry)
        return observer


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def metrics_registry() -> CollectorRegistry:
    """The registry to expose at ``/metrics``: with ``PROMETHEUS_MULTIPROC_DIR`` set (several
    worker processes), a new registry whose collector reads every worker's files at each scrape;
    else the default registry. Call it once, at start-up."""
    if _multiprocess():
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


__all__ = [
    "IAT_OFFSET_BUCKETS",
    "LATENCY_BUCKETS",
    "MultiProcessObserver",
    "PrometheusObserver",
    "metrics_registry",
    "prometheus_observer",
]
