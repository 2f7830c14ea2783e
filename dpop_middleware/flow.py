"""Drives the sans-IO verifier with real I/O: the replay store and the JWKS fetch.

Both adapters go through :class:`Engine`, so the order of steps, the mode handling
(``report_only``), the refusal log line and the ``on_refusal`` hook live in one place.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import threading
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from dpop_middleware.core.discovery import MetadataFetchNeeded, looks_like_metadata
from dpop_middleware.core.introspection import TokenAnswerNeeded
from dpop_middleware.core.keys import JWKSFetchNeeded, SkippedKey
from dpop_middleware.core.metadata import MetadataEndpoint, Reply
from dpop_middleware.core.request import RequestInfo
from dpop_middleware.core.token import Answer
from dpop_middleware.core.verifier import DPoPResult, Header, Pending, Refusal, Verifier
from dpop_middleware.errors import DPoPError, ServiceUnavailableError
from dpop_middleware.jwks import JWKSFetchError, fetch_jwks
from dpop_middleware.logfields import log_extra
from dpop_middleware.observe import (
    FetchResult,
    Observer,
    RequestEvent,
    combine,
    observed_fetch,
    overrides,
    store_name,
)
from dpop_middleware.replay.base import AsyncReplayStore, ReplayStore
from dpop_middleware.settings import Settings
from dpop_middleware.sources import TokenSources

logger = logging.getLogger("dpop_middleware")

#: Where the adapters put their :class:`Engine` (ASGI scope, WSGI environ), for the per-route
#: helpers (:mod:`dpop_middleware.routes`) to refuse exactly as the middleware does.
ENGINE_KEY = "dpop_middleware.engine"


class RouteRefusedError(Exception):
    """Raised by a per-route helper that cannot return a response itself (a FastAPI
    dependency); :class:`~dpop_middleware.DPoPMiddleware` catches it and sends ``refusal``."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.error.reason)
        self.refusal = refusal


class Outcome(NamedTuple):
    """What the adapter does: refuse (``refusal``), or call the app with ``result`` (None for an
    unprotected path or a report-only refusal) and add ``response_headers`` to its response.

    A NamedTuple: immutable, and cheap to build once per request."""

    result: DPoPResult | None = None
    refusal: Refusal | None = None
    response_headers: tuple[Header, ...] = ()
    #: ``report_only``: the refusal that was logged but not sent (for the observers).
    reported: DPoPError | None = None


_PASS = Outcome()


def _clip(value: str, size: int = 200) -> str:
    """A value from the request, fit for one field of a log line: clipped and quoted by ``repr``,
    which escapes every control and non-printable character (ESC, CR, LF, C1 controls, U+2028)
    and keeps spaces, ``=`` and quotes inside the quotes, so it cannot pass for another field."""
    return repr(value[:size])


#: An IP address (v4, v6, v6 with a zone) logs bare; anything else a server put in the client
#: address (uvicorn takes it from ``X-Forwarded-For``) is quoted like every request value.
_PLAIN_ADDRESS = re.compile(r"[0-9A-Za-z.:%_-]{1,64}")


def _client(address: str | None) -> str:
    if address is None:
        return "-"
    return address if _PLAIN_ADDRESS.fullmatch(address) else _clip(address, 100)


class Engine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.verifier = Verifier(settings)
        self._keys = self.verifier.keys  # the JWK Set holder, or None (fixed for the Engine's life)
        if self._keys is not None:
            _log_skipped(self._keys.uri, self._keys.skipped)  # from the ``jwks`` setting
        self._report_only = settings.mode == "report_only"
        self._sync_lock = threading.Lock()
        self._async_lock: asyncio.Lock | None = None
        self._sources = TokenSources(settings, self.verifier.tokens)
        metadata = settings.resource_metadata
        self._metadata = (
            MetadataEndpoint(metadata, settings.algorithms, settings.mode != "dpop_or_bearer")
            if metadata is not None
            else None
        )
        # Metrics, tracing, your own (dpop_middleware.observe): None unless one is configured,
        # and then the request path pays an ``is None`` test, never a call.
        self._observer: Observer | None = combine(
            settings.metrics, settings.tracing, *settings.observers
        )
        self._sources.observer = self._observer  # counts and traces metadata fetches
        self._clock = settings.clock
        obs = self._observer
        # Span hooks are called only for an observer that has them (metrics need none).
        self._request_hook = obs is not None and overrides(obs, "request_started")
        self._store_hooks = obs is not None and (
            overrides(obs, "replay_store_started") or overrides(obs, "replay_store_finished")
        )

    def reply(self, request: RequestInfo) -> Reply | None:
        """A response the middleware gives itself, before any check: the RFC 9728 metadata
        document (public, no authentication). None for every other request."""
        return None if self._metadata is None else self._metadata.reply(request)

    # -- refusals ------------------------------------------------------------------------------

    def _request_info(self, request: RequestInfo, error: DPoPError) -> dict[str, Any]:
        return {
            "method": request.method,
            "path": request.root_path + request.path,
            "client_ip": request.client_ip,
            "status": error.status,
            "error": error.error,
            "reason": error.reason,
        }

    def _log(self, request: RequestInfo, error: DPoPError, *, report_only: bool) -> None:
        fields = error.log_detail
        detail = "".join(f" {k}={_clip(v, 300)}" for k, v in fields.items()) if fields else ""
        event = "would_refuse" if report_only else "refused"
        logger.log(
            error.log_level,
            "dpop %s reason=%s status=%d error=%s method=%s path=%s client=%s%s",
            event,
            error.reason,
            error.status,
            error.error,
            _clip(request.method, 20),
            _clip(request.root_path + request.path),
            _client(request.client_ip),
            detail,
            extra=log_extra(event, _fields(request, error), fields),
        )

    def _notify_sync(self, request: RequestInfo, error: DPoPError, *, report_only: bool) -> None:
        """The one log line and the ``on_refusal`` hook."""
        self._log(request, error, report_only=report_only)
        hook = self.settings.on_refusal
        if hook is not None:
            try:
                outcome = hook(error.reason, self._request_info(request, error))
                if inspect.isawaitable(outcome):  # an async hook under WSGI: run it to completion
                    asyncio.run(_await(outcome))
            except Exception:  # the user's hook must not turn a refusal into a 500
                logger.exception(
                    "dpop on_refusal_hook_failed reason=%s",
                    error.reason,
                    extra=log_extra("on_refusal_hook_failed", {"reason": error.reason}),
                )

    async def _notify_async(
        self, request: RequestInfo, error: DPoPError, *, report_only: bool
    ) -> None:
        self._log(request, error, report_only=report_only)
        hook = self.settings.on_refusal
        if hook is not None:
            try:
                outcome = hook(error.reason, self._request_info(request, error))
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception:  # the user's hook must not turn a refusal into a 500
                logger.exception(
                    "dpop on_refusal_hook_failed reason=%s",
                    error.reason,
                    extra=log_extra("on_refusal_hook_failed", {"reason": error.reason}),
                )

    def _refuse_sync(self, request: RequestInfo, error: DPoPError) -> Outcome:
        self._notify_sync(request, error, report_only=self._report_only)
        if self._report_only:
            return _PASS if self._observer is None else Outcome(reported=error)
        return Outcome(refusal=self.verifier.refusal(error))

    async def _refuse_async(self, request: RequestInfo, error: DPoPError) -> Outcome:
        await self._notify_async(request, error, report_only=self._report_only)
        if self._report_only:
            return _PASS if self._observer is None else Outcome(reported=error)
        return Outcome(refusal=self.verifier.refusal(error))

    # -- per-route checks (the framework helpers) ------------------------------------------------

    def route_refusal_sync(self, request: RequestInfo, error: DPoPError) -> Refusal:
        """A per-route helper's refusal: logged, hooked and rendered exactly like the
        middleware's own. Always a refusal, ``report_only`` or not: the route asked for it."""
        self._notify_sync(request, error, report_only=False)
        return self.verifier.refusal(error)

    async def route_refusal_async(self, request: RequestInfo, error: DPoPError) -> Refusal:
        await self._notify_async(request, error, report_only=False)
        return self.verifier.refusal(error)

    # -- JWKS ----------------------------------------------------------------------------------

    def _load_jwks(self, document: Mapping[str, Any] | None) -> FetchResult:
        """Load a fetched JWK Set (None: the fetch failed); say how it went."""
        keys = self.verifier.keys
        assert keys is not None
        now = self.verifier.now()
        if document is None:
            keys.fetch_failed(now=now)
            return "error"
        try:
            skipped = keys.load(document, now=now)
        except ValueError as exc:
            _log_skipped(keys.uri, keys.skipped)
            keys.fetch_failed(now=now)
            if looks_like_metadata(document):
                logger.error(
                    "dpop jwks_invalid uri=%s: this is an authorization server metadata document, "
                    "not a JWK Set; set 'jwks_uri' to its jwks_uri member (%s), or leave "
                    "'jwks_uri' out to read it from the issuer's metadata",
                    keys.uri,
                    _clip(str(document.get("jwks_uri", "-"))),
                )
                return "invalid"
            logger.error(
                "dpop jwks_invalid uri=%s: %s; %s, next attempt in %g s at the earliest",
                keys.uri,
                exc,
                "keeping the last good JWK Set" if keys.key_set else "no JWK Set yet",
                keys.retry_delay,
                extra=log_extra(
                    "jwks_invalid",
                    {"uri": keys.uri, "cause": str(exc), "retry_delay": keys.retry_delay},
                ),
            )
            return "invalid"
        _log_skipped(keys.uri, skipped)
        return "ok"

    def _fetch(self, uri: str) -> Mapping[str, Any] | None:
        try:
            return fetch_jwks(uri, self.settings.jwks_fetch_timeout)
        except JWKSFetchError as exc:
            logger.error(
                "dpop jwks_fetch_failed uri=%s: %s",
                uri,
                exc,
                extra=log_extra("jwks_fetch_failed", {"uri": uri, "cause": str(exc)}),
            )
            return None

    def refresh_jwks_sync(self, need: JWKSFetchNeeded, seen_attempt: float) -> None:
        keys = self.verifier.keys
        assert keys is not None
        with self._sync_lock:
            if keys.attempted_at != seen_attempt:
                return  # another thread fetched while we waited
            with observed_fetch(self._observer, "jwks") as fetch:
                fetch.result = self._load_jwks(self._fetch(need.uri))

    async def refresh_jwks_async(self, need: JWKSFetchNeeded, seen_attempt: float) -> None:
        keys = self.verifier.keys
        assert keys is not None
        if self._async_lock is None:
            self._async_lock = asyncio.Lock()
        async with self._async_lock:
            if keys.attempted_at != seen_attempt:
                return
            with observed_fetch(self._observer, "jwks") as fetch:
                fetch.result = self._load_jwks(await asyncio.to_thread(self._fetch, need.uri))

    # -- the core's check, with the I/O it asks for ---------------------------------------------

    def _check_sync(self, request: RequestInfo) -> Pending | None:
        """``verifier.check``, fetching what the core asks for in between (the issuer's metadata,
        its JWK Set, a token's introspection or ``token_verifier`` answer), each at most once."""
        keys = self._keys
        seen = keys.attempted_at if keys is not None else 0.0
        try:
            pending = self.verifier.check(request, None)
        except (JWKSFetchNeeded, MetadataFetchNeeded, TokenAnswerNeeded) as need:
            return self._fetch_and_check_sync(request, need, seen)
        if pending is not None and pending.answered and self._observer is not None:
            self._observer.introspection_cache(True)  # answered from the cache
        return pending

    def _fetch_and_check_sync(
        self, request: RequestInfo, need: Exception, seen: float
    ) -> Pending | None:
        answer: Answer | None = None
        asked: set[type[Exception]] = set()
        while True:
            _ask_once(asked, need)
            if isinstance(need, JWKSFetchNeeded):
                self.refresh_jwks_sync(need, seen)
            elif isinstance(need, MetadataFetchNeeded):
                self._sources.refresh_metadata_sync(need)
            else:
                assert isinstance(need, TokenAnswerNeeded)
                if self._observer is not None:
                    self._observer.introspection_cache(False)
                with observed_fetch(self._observer, "introspection") as fetch:
                    answer = (need.key, self._sources.answer_sync(need))
                    fetch.result = "ok"
            keys = self._keys
            seen = keys.attempted_at if keys is not None else 0.0
            try:
                return self.verifier.check(request, answer)
            except (JWKSFetchNeeded, MetadataFetchNeeded, TokenAnswerNeeded) as again:
                need = again

    async def _check_async(self, request: RequestInfo) -> Pending | None:
        """:meth:`_check_sync` without blocking the event loop."""
        keys = self._keys
        seen = keys.attempted_at if keys is not None else 0.0
        try:
            pending = self.verifier.check(request, None)
        except (JWKSFetchNeeded, MetadataFetchNeeded, TokenAnswerNeeded) as need:
            return await self._fetch_and_check_async(request, need, seen)
        if pending is not None and pending.answered and self._observer is not None:
            self._observer.introspection_cache(True)  # answered from the cache
        return pending

    async def _fetch_and_check_async(
        self, request: RequestInfo, need: Exception, seen: float
    ) -> Pending | None:
        answer: Answer | None = None
        asked: set[type[Exception]] = set()
        while True:
            _ask_once(asked, need)
            if isinstance(need, JWKSFetchNeeded):
                await self.refresh_jwks_async(need, seen)
            elif isinstance(need, MetadataFetchNeeded):
                await self._sources.refresh_metadata_async(need)
            else:
                assert isinstance(need, TokenAnswerNeeded)
                if self._observer is not None:
                    self._observer.introspection_cache(False)
                with observed_fetch(self._observer, "introspection") as fetch:
                    answer = (need.key, await self._sources.answer_async(need))
                    fetch.result = "ok"
            keys = self._keys
            seen = keys.attempted_at if keys is not None else 0.0
            try:
                return self.verifier.check(request, answer)
            except (JWKSFetchNeeded, MetadataFetchNeeded, TokenAnswerNeeded) as again:
                need = again

    # -- the request ---------------------------------------------------------------------------

    def run_sync(self, request: RequestInfo, store: ReplayStore) -> Outcome:
        obs = self._observer
        if obs is None:
            return self._run_sync(request, store, None)
        start, probe, outcome = _now(), _Probe(), None
        handle = obs.request_started() if self._request_hook else None
        try:
            outcome = self._run_sync(request, store, probe)
        finally:
            obs.request_finished(handle, self._event(outcome, _now() - start, probe))
        return outcome

    def _run_sync(self, request: RequestInfo, store: ReplayStore, probe: _Probe | None) -> Outcome:
        try:
            pending = self._check_sync(request)
            if pending is None:
                return _PASS
            if pending.replay_key is not None:
                try:
                    if probe is None:
                        first = store.add(pending.replay_key, pending.ttl)
                    else:
                        first = self._observed_add_sync(
                            store, pending.replay_key, pending.ttl, probe
                        )
                except Exception as exc:  # any store failure, a bug in a store too: fail closed
                    raise _store_down(exc) from exc
                if not first:
                    self.verifier.finish(pending, first)  # raises: replayed
        except DPoPError as error:
            return self._refuse_sync(request, error)
        return Outcome(pending.result, None, pending.response_headers)

    async def run_async(self, request: RequestInfo, store: AsyncReplayStore) -> Outcome:
        obs = self._observer
        if obs is None:
            return await self._run_async(request, store, None)
        start, probe, outcome = _now(), _Probe(), None
        handle = obs.request_started() if self._request_hook else None
        try:
            outcome = await self._run_async(request, store, probe)
        finally:
            obs.request_finished(handle, self._event(outcome, _now() - start, probe))
        return outcome

    async def _run_async(
        self, request: RequestInfo, store: AsyncReplayStore, probe: _Probe | None
    ) -> Outcome:
        try:
            pending = await self._check_async(request)
            if pending is None:
                return _PASS
            if pending.replay_key is not None:
                try:
                    if probe is None:
                        first = await store.add(pending.replay_key, pending.ttl)
                    else:
                        first = await self._observed_add_async(
                            store, pending.replay_key, pending.ttl, probe
                        )
                except Exception as exc:  # any store failure, a bug in a store too: fail closed
                    raise _store_down(exc) from exc
                if not first:
                    self.verifier.finish(pending, first)  # raises: replayed
        except DPoPError as error:
            return await self._refuse_async(request, error)
        return Outcome(pending.result, None, pending.response_headers)

    # -- observers (dpop_middleware.observe): only called when one is configured --------------

    def _observed_add_sync(self, store: ReplayStore, key: bytes, ttl: float, probe: _Probe) -> bool:
        obs = self._observer
        assert obs is not None
        hooks = self._store_hooks
        handle = obs.replay_store_started() if hooks else None
        error, start = None, _now()
        try:
            return store.add(key, ttl)
        except BaseException as exc:
            error = exc
            raise
        finally:
            seconds = probe.seconds = _now() - start
            probe.store = store_name(store)
            probe.failed = error is not None
            if hooks:
                obs.replay_store_finished(handle, probe.store, seconds, error)

    async def _observed_add_async(
        self, store: AsyncReplayStore, key: bytes, ttl: float, probe: _Probe
    ) -> bool:
        obs = self._observer
        assert obs is not None
        hooks = self._store_hooks
        handle = obs.replay_store_started() if hooks else None
        error, start = None, _now()
        try:
            return await store.add(key, ttl)
        except BaseException as exc:
            error = exc
            raise
        finally:
            seconds = probe.seconds = _now() - start
            probe.store = store_name(store)
            probe.failed = error is not None
            if hooks:
                obs.replay_store_finished(handle, probe.store, seconds, error)

    def _event(self, outcome: Outcome | None, seconds: float, probe: _Probe) -> RequestEvent:
        """What the observers learn of one request: codes, status, scheme, thumbprint, times."""
        store, took, failed = probe.store, probe.seconds, probe.failed
        if outcome is None:  # an exception escaped (a bug): the server answers 500
            return RequestEvent(
                "error", "", 500, "", None, seconds, None, False, store, took, failed
            )
        refusal = outcome.refusal
        if refusal is not None:
            return RequestEvent(
                "refused", refusal.error.reason, refusal.status, "", None, seconds, None,
                _has_nonce(refusal.headers), store, took, failed,
            )  # fmt: skip
        result = outcome.result
        if result is not None:
            headers = outcome.response_headers
            iat = result.proof_claims.get("iat")  # checked: a number (never a bool) or absent
            offset = iat - self._clock() if type(iat) is int or type(iat) is float else None
            return RequestEvent(
                "accepted", "", 0, result.scheme, result.jkt, seconds, offset,
                _has_nonce(headers) if headers else False, store, took, failed,
            )  # fmt: skip
        error = outcome.reported
        if error is not None:
            status = error.status
            if self.settings.always_401 and status in (400, 403):
                status = 401  # as Verifier.refusal would have sent it
            return RequestEvent(
                "would_refuse", error.reason, status, "", None, seconds, None, False,
                store, took, failed,
            )  # fmt: skip
        return RequestEvent("passed", "", 0, "", None, seconds, None, False, store, took, failed)


class _Probe:
    """One observed request's replay-store call: a local of ``run_sync``/``run_async`` that the
    store call fills in (class defaults: nothing recorded)."""

    store = ""
    seconds: float | None = None
    failed = False


_now = time.perf_counter


def _has_nonce(headers: tuple[Header, ...]) -> bool:
    return any(name == "dpop-nonce" for name, _ in headers)


def _log_skipped(uri: str | None, skipped: tuple[SkippedKey, ...]) -> None:
    """One line per key of the JWK Set that was not loaded: its kid and why (never the key)."""
    for each in skipped:
        logger.warning(
            "dpop jwks_key_skipped uri=%s kid=%s: %s",
            uri or "<jwks setting>",
            _clip(each.kid) if each.kid is not None else "-",
            each.reason,
            extra=log_extra(
                "jwks_key_skipped",
                {"uri": uri or "<jwks setting>", "kid": each.kid, "cause": each.reason},
            ),
        )


_STILL_NEEDED = {
    JWKSFetchNeeded: ("jwks_unavailable", "Signing keys are not available"),
    MetadataFetchNeeded: (
        "metadata_unavailable",
        "The authorization server's metadata is not available",
    ),
    TokenAnswerNeeded: (
        "introspection_unavailable",
        "The access token cannot be checked right now",
    ),
}


def _ask_once(asked: set[type[Exception]], need: Exception) -> None:
    """A request gets each kind of fetch once: asked again, it is a 503 (fail closed)."""
    kind = type(need)
    if kind in asked:
        reason, description = _STILL_NEEDED[kind]
        raise ServiceUnavailableError(reason, description) from None
    asked.add(kind)


def _fields(request: RequestInfo, error: DPoPError) -> dict[str, Any]:
    """The refusal line's fields, for ``extra`` (dpop_middleware.logfields)."""
    return {
        "reason": error.reason,
        "status": error.status,
        "error": error.error,
        "method": request.method,
        "path": request.root_path + request.path,
        "client": request.client_ip,
    }


def _store_down(exc: Exception) -> ServiceUnavailableError:
    return ServiceUnavailableError(
        "replay_store_unavailable",
        "Replay protection is temporarily unavailable",
        log_detail={"cause": f"{type(exc).__name__}: {exc}"},
    )


async def _await(awaitable: Any) -> None:
    await awaitable
