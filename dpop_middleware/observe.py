"""The observer interface: what :class:`~dpop_middleware.flow.Engine` tells metrics and tracing.

One small interface for every optional integration (:mod:`dpop_middleware.prometheus`,
:mod:`dpop_middleware.otel`, or your own object in the ``observers`` setting). The Engine holds
one observer or ``None``; with ``None`` (the default) a request pays an ``is None`` test, never a
call.

What an observer is told is safe to export: stable reason codes (:mod:`dpop_middleware.errors`),
statuses, the scheme, the proof key's RFC 7638 thumbprint (public by design), durations and
counts. Never a token, a proof, a key or a claim value.

Every method runs on the request path (sync under WSGI, on the event loop under ASGI): keep
them quick and non-blocking, and do not raise.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

#: What happened to a request the Engine ran. ``passed``: not protected (``exclude_paths``, a
#: passed preflight); ``would_refuse``: refused in ``report_only`` mode (the app was called);
#: ``error``: an unexpected exception escaped the Engine (a bug; the server answers 500).
OutcomeKind = Literal["accepted", "refused", "passed", "would_refuse", "error"]
#: What was fetched: the issuer's JWK Set, authorization server metadata, token introspection.
FetchKind = Literal["jwks", "metadata", "introspection"]
#: How a fetch ended: ``ok``; ``error`` (network, HTTP status, size, deadline); ``invalid`` (it
#: came back but was refused: not JSON, not a JWK Set, ...).
FetchResult = Literal["ok", "error", "invalid"]


class RequestEvent(NamedTuple):
    """One request's outcome, built once per observed request."""

    outcome: OutcomeKind
    #: The stable reason code of a refusal (``refused``, ``would_refuse``), else ``""``.
    reason: str
    #: The HTTP status sent (``refused``) or that would have been (``would_refuse``), else 0.
    status: int
    #: ``"DPoP"`` or ``"Bearer"`` for an accepted request, else ``""``.
    scheme: str
    #: The proof key's RFC 7638 thumbprint for an accepted DPoP request, else None.
    jkt: str | None
    #: The middleware's own time (verification, replay store, any fetch), not the app's.
    seconds: float
    #: ``iat`` of an accepted proof minus the server's clock (positive: client clock ahead).
    iat_offset: float | None
    #: A ``DPoP-Nonce`` went out with the response (a fresh nonce issued).
    nonce_issued: bool
    #: The replay store's short name (:func:`store_name`) if it was called, else ``""``.
    store: str = ""
    #: How long the replay-store call took, if there was one.
    store_seconds: float | None = None
    #: The replay-store call failed (the request was refused with 503).
    store_error: bool = False


@runtime_checkable
class Observer(Protocol):
    """What the Engine calls. ``*_started`` returns a handle (a span, or None) that the Engine
    hands back to the matching ``*_finished``; ``started``/``finished`` pairs nest like the
    work they time, on one thread or one task.

    ``request_finished`` gets everything about a request, the replay-store call included;
    ``request_started`` and the ``replay_store_*`` pair are for spans, and a subclass of
    :class:`BaseObserver` that does not override them is not called for them at all (a
    metrics observer pays for one call per request).
    """

    def request_started(self) -> Any: ...

    def request_finished(self, handle: Any, event: RequestEvent) -> None: ...

    def replay_store_started(self) -> Any: ...

    def replay_store_finished(
        self, handle: Any, store: str, seconds: float, error: BaseException | None
    ) -> None: ...

    def fetch_started(self, kind: FetchKind) -> Any: ...

    def fetch_finished(self, handle: Any, kind: FetchKind, result: FetchResult) -> None: ...

    def introspection_cache(self, hit: bool) -> None: ...


class FetchOutcome:
    """What :func:`observed_fetch` reports; the fetching code sets ``result`` when it knows."""

    __slots__ = ("result",)

    def __init__(self) -> None:
        self.result: FetchResult = "error"


@contextmanager
def observed_fetch(observer: Observer | None, kind: FetchKind) -> Iterator[FetchOutcome]:
    """Time and count one fetch of ``kind`` (``fetch_started`` / ``fetch_finished``): the one
    place the JWK Set, metadata and introspection fetches are observed. Without an observer it
    only hands out the outcome to fill in. A fetch that raises is reported as ``"error"``."""
    outcome = FetchOutcome()
    if observer is None:
        yield outcome
        return
    handle = observer.fetch_started(kind)
    try:
        yield outcome
    except BaseException:
        outcome.result = "error"
        raise
    finally:
        observer.fetch_finished(handle, kind, outcome.result)


class BaseObserver:
    """Every method a no-op: subclass it and override only what you need."""

    def request_started(self) -> Any:
        return None

    def request_finished(self, handle: Any, event: RequestEvent) -> None:
        return None

    def replay_store_started(self) -> Any:
        return None

    def replay_store_finished(
        self, handle: Any, store: str, seconds: float, error: BaseException | None
    ) -> None:
        return None

    def fetch_started(self, kind: FetchKind) -> Any:
        return None

    def fetch_finished(self, handle: Any, kind: FetchKind, result: FetchResult) -> None:
        return None

    def introspection_cache(self, hit: bool) -> None:
        return None


def overrides(observer: object, name: str) -> bool:
    """``observer`` has its own ``name`` method (not :class:`BaseObserver`'s no-op)."""
    return getattr(type(observer), name, None) is not getattr(BaseObserver, name)


#: The methods an object in ``observers`` must have (checked at start-up).
OBSERVER_METHODS: tuple[str, ...] = tuple(
    name for name in vars(BaseObserver) if not name.startswith("_")
)


class FanOut:
    """Several observers as one: each is called in turn; handles travel as a tuple."""

    __slots__ = ("observers",)

    def __init__(self, observers: tuple[Observer, ...]) -> None:
        self.observers = observers

    def request_started(self) -> Any:
        return tuple(o.request_started() for o in self.observers)

    def request_finished(self, handle: Any, event: RequestEvent) -> None:
        # Finished in reverse: the last started (the innermost span) ends first.
        for o, h in zip(self.observers[::-1], handle[::-1], strict=True):
            o.request_finished(h, event)

    def replay_store_started(self) -> Any:
        return tuple(o.replay_store_started() for o in self.observers)

    def replay_store_finished(
        self, handle: Any, store: str, seconds: float, error: BaseException | None
    ) -> None:
        for o, h in zip(self.observers[::-1], handle[::-1], strict=True):
            o.replay_store_finished(h, store, seconds, error)

    def fetch_started(self, kind: FetchKind) -> Any:
        return tuple(o.fetch_started(kind) for o in self.observers)

    def fetch_finished(self, handle: Any, kind: FetchKind, result: FetchResult) -> None:
        for o, h in zip(self.observers[::-1], handle[::-1], strict=True):
            o.fetch_finished(h, kind, result)

    def introspection_cache(self, hit: bool) -> None:
        for o in self.observers:
            o.introspection_cache(hit)


def combine(*observers: Observer | None) -> Observer | None:
    """None without observers (the Engine then makes no call), the one observer, or a fan-out."""
    present = tuple(o for o in observers if o is not None)
    if not present:
        return None
    return present[0] if len(present) == 1 else FanOut(present)


_STORE_NAMES: dict[type, str] = {}


def store_name(store: object) -> str:
    """A short, bounded label for a replay store: ``memory``, ``redis``, or the class name of
    your own store (lower-cased)."""
    kind = type(store)
    name = _STORE_NAMES.get(kind)
    if name is None:
        module = kind.__module__
        if module.startswith("dpop_middleware.replay.memory"):
            name = "memory"
        elif module.startswith("dpop_middleware.replay.redis"):
            name = "redis"
        else:
            name = kind.__name__.lower()[:40]
        _STORE_NAMES[kind] = name
    return name


#: A reason code's shape: what every code in :mod:`dpop_middleware.errors` looks like.
REASON_SHAPE = re.compile(r"[a-z][a-z0-9_]{0,47}")


class ReasonLabels:
    """Reasons as metric labels, bounded: a code of the usual shape passes, up to ``limit``
    distinct ones (the package has a few dozen); anything else (a ``token_verifier`` raising
    its own codes) becomes ``other``, so a label set can never grow without bound."""

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int = 100) -> None:
        self._seen: set[str] = {""}
        self._limit = limit

    def __call__(self, reason: str) -> str:
        if reason in self._seen:
            return reason
        if len(self._seen) > self._limit or not REASON_SHAPE.fullmatch(reason):
            return "other"
        self._seen.add(reason)
        return reason


__all__ = [
    "OBSERVER_METHODS",
    "BaseObserver",
    "FanOut",
    "FetchKind",
    "FetchResult",
    "Observer",
    "OutcomeKind",
    "ReasonLabels",
    "RequestEvent",
    "combine",
    "overrides",
    "store_name",
]
