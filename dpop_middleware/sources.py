"""The I/O the core asks for besides the JWK Set: the issuer's metadata (RFC 8414), introspection
answers (RFC 7662) and ``token_verifier`` calls. ``flow.Engine`` decides when (the core raises
:class:`~dpop_middleware.core.discovery.MetadataFetchNeeded` or
:class:`~dpop_middleware.core.introspection.TokenAnswerNeeded`); this module does it, through
the one fetch layer (:mod:`dpop_middleware.fetch`).

The guarantees:

* Never on the event loop: under ASGI, HTTP and plain verifiers run in a thread pool, ``async def``
  verifiers are awaited; under WSGI everything runs in the request's thread (an ``async def``
  verifier to completion in a private event loop, ``asyncio.run``).
* Single flight: concurrent requests with one token make one call (sync: the first caller asks
  while the others wait on its event; async: a shared future).
* Fail closed: an endpoint that is down, slow or answers garbage, or a verifier that raises
  something other than our errors, is a 503 whose log line names the cause; never a pass. The
  log never holds a token or the client secret.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dpop_middleware.core.discovery import (
    IssuerMetadata,
    MetadataError,
    MetadataFetchNeeded,
    shared_algorithms,
)
from dpop_middleware.core.introspection import (
    IntrospectionAnswerError,
    Refused,
    TokenAnswerNeeded,
    parse_answer,
    request_form,
)
from dpop_middleware.core.token import Accepted, AccessTokenChecker, broken_verifier
from dpop_middleware.errors import (
    DPoPError,
    InvalidTokenError,
    ServiceUnavailableError,
    TokenVerifierError,
)
from dpop_middleware.fetch import FetchError, fetch_json, post_form
from dpop_middleware.observe import Observer, observed_fetch
from dpop_middleware.settings import Settings, is_async_callable

logger = logging.getLogger("dpop_middleware")

#: Threads for blocking token checks under ASGI (introspection calls, plain verifiers): enough
#: that a slow verifier does not queue requests behind each other.
MAX_WORKERS = 32

Entry = Accepted | Refused


def _unavailable(endpoint: str, cause: str) -> ServiceUnavailableError:
    return ServiceUnavailableError(
        "introspection_unavailable",
        "The access token cannot be checked right now",
        log_detail={"endpoint": endpoint, "cause": cause},
    )


def _verifier_raised(exc: Exception) -> TokenVerifierError:
    # The exception's type only: its message could hold the token.
    return TokenVerifierError(
        "token_verifier_error",
        "The access token cannot be checked right now",
        log_detail={"raised": type(exc).__name__},
    )


class _Flight:
    __slots__ = ("done", "entry", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.entry: Entry | None = None
        self.error: DPoPError | None = None


class TokenSources:
    def __init__(self, settings: Settings, tokens: AccessTokenChecker) -> None:
        self._settings = settings
        self._tokens = tokens
        self._clock = settings.clock
        self._verifier = settings.token_verifier
        self._async_verifier = self._verifier is not None and is_async_callable(self._verifier)
        self._introspection = settings.introspection
        self._discovery: IssuerMetadata | None = tokens.discovery
        self._metadata_lock = threading.Lock()
        self._async_metadata_lock: asyncio.Lock | None = None
        self._algorithms_checked = False
        #: Set by the Engine when metrics or tracing are on.
        self.observer: Observer | None = None
        self._flights: dict[bytes, _Flight] = {}
        self._flights_lock = threading.Lock()
        self._futures: dict[tuple[int, bytes], asyncio.Future[Entry]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0

    # -- metadata ----------------------------------------------------------------------------

    def refresh_metadata_sync(self, need: MetadataFetchNeeded) -> None:
        discovery = self._discovery
        assert discovery is not None
        with self._metadata_lock:
            if discovery.attempted_at != need.seen:
                return  # another thread fetched while we waited
            self._observed_fetch_metadata(need.urls)

    async def refresh_metadata_async(self, need: MetadataFetchNeeded) -> None:
        discovery = self._discovery
        assert discovery is not None
        if self._async_metadata_lock is None:
            self._async_metadata_lock = asyncio.Lock()
        async with self._async_metadata_lock:
            if discovery.attempted_at != need.seen:
                return
            await asyncio.to_thread(self._observed_fetch_metadata, need.urls)

    def _observed_fetch_metadata(self, urls: tuple[str, ...]) -> None:
        with observed_fetch(self.observer, "metadata") as fetch:
            fetch.result = "ok" if self._fetch_metadata(urls) else "error"

    def _fetch_metadata(self, urls: tuple[str, ...]) -> bool:
        """Try each well-known URL in turn; load the first usable document (RFC 8414 section
        3.3), else record a failure and log every URL's cause in one line."""
        discovery = self._discovery
        assert discovery is not None
        causes = []
        for url in urls:
            try:
                document = fetch_json(url, timeout=self._settings.jwks_fetch_timeout)
                metadata = discovery.load(document, now=self._clock())
            except (FetchError, MetadataError) as exc:
                causes.append(f"{url}: {exc}")
                continue
            if not self._algorithms_checked:
                self._algorithms_checked = True
                if not shared_algorithms(metadata, self._settings.algorithms):
                    logger.warning(
                        "dpop metadata_algorithms_disjoint issuer=%s: the authorization server "
                        "accepts DPoP proofs signed with %s, the 'algorithms' setting allows %s; "
                        "no client can satisfy both",
                        discovery.issuer,
                        " ".join(metadata.dpop_algs or ()),
                        " ".join(self._settings.algorithms),
                    )
            return True
        discovery.fetch_failed(now=self._clock())
        logger.error(
            "dpop metadata_fetch_failed issuer=%s: %s; next attempt in %g s at the earliest",
            discovery.issuer,
            "; ".join(causes),
            discovery.retry_delay,
        )
        return False

    # -- token answers -------------------------------------------------------------------------

    def answer_sync(self, need: TokenAnswerNeeded) -> Entry:
        """The answer for the token, one call for all threads asking at once."""
        with self._flights_lock:
            flight = self._flights.get(need.key)
            leader = flight is None
            if flight is None:
                flight = self._flights[need.key] = _Flight()
        if not leader:
            flight.done.wait(self._wait_limit())
            return self._followed(flight, need)
        try:
            flight.entry = self._ask_blocking(need)
        except DPoPError as error:
            flight.error = error
            raise
        finally:
            with self._flights_lock:
                del self._flights[need.key]
            flight.done.set()
        return flight.entry

    def _followed(self, flight: _Flight, need: TokenAnswerNeeded) -> Entry:
        if flight.error is not None:
            raise flight.error
        if flight.entry is None:
            raise self._interrupted(need)
        return flight.entry

    def _interrupted(self, need: TokenAnswerNeeded) -> DPoPError:
        if need.endpoint is not None:
            return _unavailable(need.endpoint, "the concurrent introspection did not finish")
        return TokenVerifierError(
            "token_verifier_error",
            "The access token cannot be checked right now",
            log_detail={"cause": "the concurrent token_verifier call did not finish"},
        )

    def _wait_limit(self) -> float | None:
        intro = self._introspection
        return intro.timeout + 1.0 if intro is not None else None

    async def answer_async(self, need: TokenAnswerNeeded) -> Entry:
        """As :meth:`answer_sync`, without blocking the event loop."""
        loop = asyncio.get_running_loop()
        key = (id(loop), need.key)
        shared = self._futures.get(key)
        if shared is not None:
            return await asyncio.shield(shared)
        future: asyncio.Future[Entry] = loop.create_future()
        self._futures[key] = future
        try:
            if self._async_verifier:
                entry = await self._ask_async_verifier(need)
            else:
                entry = await loop.run_in_executor(self._executor(), self._ask_blocking, need)
        except DPoPError as error:
            _fail(future, error)
            raise
        except BaseException:  # cancelled (the client went away), or a bug: followers get 503
            _fail(future, self._interrupted(need))
            raise
        else:
            future.set_result(entry)
            return entry
        finally:
            del self._futures[key]

    def _executor(self) -> ThreadPoolExecutor:
        pid = os.getpid()
        if self._pool is None or self._pool_pid != pid:  # a forked worker makes its own
            self._pool = ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="dpop-token-check")
            self._pool_pid = pid
        return self._pool

    def _ask_blocking(self, need: TokenAnswerNeeded) -> Entry:
        if need.endpoint is not None:
            return self._introspect(need, need.endpoint)
        verifier = self._verifier
        assert verifier is not None
        try:
            if self._async_verifier:
                claims = asyncio.run(_awaited(verifier, need.token))  # WSGI: a private loop
            else:
                claims = verifier(need.token)
        except InvalidTokenError as error:
            self._tokens.refused_by_verifier(need.key, error, self._clock())
            raise
        except DPoPError:
            raise
        except Exception as exc:  # the application's verifier failed: 503, never a 500
            raise _verifier_raised(exc) from exc
        return self._verified(need, claims)

    async def _ask_async_verifier(self, need: TokenAnswerNeeded) -> Entry:
        verifier = self._verifier
        assert verifier is not None
        try:
            claims = await verifier(need.token)  # type: ignore[misc]
        except InvalidTokenError as error:
            self._tokens.refused_by_verifier(need.key, error, self._clock())
            raise
        except DPoPError:
            raise
        except Exception as exc:  # the application's verifier failed: 503, never a 500
            raise _verifier_raised(exc) from exc
        return self._verified(need, claims)

    def _verified(self, need: TokenAnswerNeeded, claims: Any) -> Entry:
        if not isinstance(claims, Mapping):
            raise broken_verifier(claims)
        return self._tokens.answer(need.key, need.token, claims, self._clock(), introspected=False)

    def _introspect(self, need: TokenAnswerNeeded, endpoint: str) -> Entry:
        """RFC 7662 section 2.1: POST the token with ``token_type_hint=access_token``."""
        client = self._introspection
        assert client is not None
        form, headers = request_form(need.token, client)
        try:
            answer = post_form(endpoint, form, headers=headers, timeout=client.timeout)
            document = parse_answer(answer.content_type, answer.body)
        except (FetchError, IntrospectionAnswerError) as exc:
            raise _unavailable(endpoint, str(exc)) from None
        return self._tokens.answer(need.key, need.token, document, self._clock(), introspected=True)


def _fail(future: asyncio.Future[Entry], error: DPoPError) -> None:
    future.set_exception(error)
    future.exception()  # marks it retrieved: no "never retrieved" warning without followers


async def _awaited(verifier: Any, token: str) -> Any:
    return await verifier(token)
