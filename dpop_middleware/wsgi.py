"""``DPoPWSGIMiddleware``: pure WSGI (Flask, Django, any PEP 3333 app).

WSGI servers join repeated request headers with ", ": a compact JWS and a token68 never contain a
comma, so the core treats a comma in ``DPoP`` (or after a ``DPoP``/``Bearer`` scheme in
``Authorization``) as two headers and refuses (RFC 9449 section 4.3 step 1).
The replay store is built at start-up and connects on first use, so each worker process after a
fork has its own pool.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from types import TracebackType
from typing import Any

from dpop_middleware.core.metadata import Reply
from dpop_middleware.core.request import RequestInfo, encoded_path
from dpop_middleware.core.verifier import Refusal
from dpop_middleware.flow import ENGINE_KEY, Engine
from dpop_middleware.replay import MemoryReplayStore, create_sync_store
from dpop_middleware.replay.base import ReplayStore
from dpop_middleware.settings import Settings

Environ = dict[str, Any]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


def _port(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def request_info(environ: Environ) -> RequestInfo:
    """The neutral request view of a WSGI environ (PEP 3333 strings are latin-1 bytes)."""
    headers = tuple(
        (key[5:].replace("_", "-").lower(), value)
        for key, value in environ.items()
        if key.startswith("HTTP_") and isinstance(value, str)
    )
    root = environ.get("SCRIPT_NAME", "")
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    path = environ.get("PATH_INFO", "").encode("latin-1")
    return RequestInfo(
        method=environ.get("REQUEST_METHOD", "GET"),
        scheme=environ.get("wsgi.url_scheme", "http"),
        path=encoded_path(path, raw, root),
        root_path=encoded_path(root.encode("latin-1"), None),
        headers=headers,
        query_string=environ.get("QUERY_STRING", ""),
        client_ip=environ.get("REMOTE_ADDR"),
        server=(environ.get("SERVER_NAME", ""), _port(environ.get("SERVER_PORT"))),
        # What the application's router matches: PATH_INFO as text (werkzeug and Django decode
        # it as UTF-8 the same way).
        route_path=path.decode("utf-8", "replace") or "/",
    )


class DPoPWSGIMiddleware:
    """Wrap a WSGI app: ``DPoPWSGIMiddleware(app, settings={...})``.

    The verified :class:`~dpop_middleware.DPoPResult` is put in ``environ["dpop"]``.
    ``store`` overrides the ``replay_store`` setting with a ready :class:`ReplayStore`.
    """

    def __init__(
        self,
        app: WSGIApp,
        settings: Mapping[str, Any] | Settings,
        *,
        store: ReplayStore | None = None,
    ) -> None:
        self.app = app
        self.settings = settings if isinstance(settings, Settings) else Settings.from_dict(settings)
        self.engine = Engine(self.settings)
        # Built now, so a bad store setting or a failed ``ping_on_startup`` stops start-up; the
        # stores open their connections on first use, and again after a fork.
        self.store: ReplayStore = (
            store
            if store is not None
            else create_sync_store(self.settings.replay_store, replay_ttl=self.settings.replay_ttl)
        )
        self._first_request = True

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if self._first_request:  # PEP 3333: the server says whether other processes serve too
            self._first_request = False
            if environ.get("wsgi.multiprocess") and isinstance(self.store, MemoryReplayStore):
                self.store.warn_shared("the WSGI server runs several processes (wsgi.multiprocess)")
        request = request_info(environ)
        reply = self.engine.reply(request)  # the RFC 9728 document, else None
        if reply is not None:
            return _respond(reply, environ, start_response)
        outcome = self.engine.run_sync(request, self.store)
        refusal = outcome.refusal
        if refusal is not None:
            return _respond(refusal, environ, start_response)
        # The per-route helpers (dpop_middleware.routes) refuse through this Engine.
        environ[ENGINE_KEY] = self.engine
        if outcome.result is not None:
            environ["dpop"] = outcome.result
        extra = outcome.response_headers
        if not extra:
            return self.app(environ, start_response)
        names = {name for name, _ in extra}

        def start_with_headers(
            status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
        ) -> Callable[[bytes], object]:
            kept = [(k, v) for k, v in headers if k.lower() not in names]
            return start_response(status, kept + [(_title(k), v) for k, v in extra], exc_info)

        return self.app(environ, start_with_headers)


def _respond(
    response: Refusal | Reply, environ: Environ, start_response: StartResponse
) -> Iterable[bytes]:
    status = f"{response.status} {HTTPStatus(response.status).phrase}"
    headers = [*response.headers, ("content-length", str(len(response.body)))]
    start_response(status, [(_title(k), v) for k, v in headers])
    # A HEAD response has no body (RFC 9110 section 9.3.2); Content-Length stays.
    return [] if environ.get("REQUEST_METHOD") == "HEAD" else [response.body]


_SPELLING = {"www-authenticate": "WWW-Authenticate", "dpop-nonce": "DPoP-Nonce"}


def _title(name: str) -> str:
    """The usual spelling of a header name (names are case-insensitive; this is for people)."""
    return _SPELLING.get(name) or "-".join(part.capitalize() for part in name.split("-"))
