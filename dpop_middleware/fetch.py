"""The one outbound HTTP layer: a GET (documents) and a form POST (RFC 7662 introspection), each
with a total deadline and a size limit (blocking I/O; the ASGI adapter runs it in a thread).

Used for the issuer's JWK Set, its authorization server metadata and token introspection:
callers (``flow.Engine``) decide *when* to fetch, this module decides *how*, the same way for all
of them. A failure's message names its cause in words an operator can act on (``HTTP 404``,
``connection refused``, ``no complete answer within 5 s``) and never carries a request body.

A socket timeout bounds one read, not a fetch: an endpoint that sends one byte a second never
trips it. Here ``timeout`` is the whole fetch: connecting is given what is left of it, and a
watchdog shuts the socket down at the deadline, so a slow-drip answer ends then, with an error
that says so. (Name resolution is left to the system resolver and its own timeouts.)
Redirects are followed only to the same scheme (never from ``https`` to ``http``).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any, NamedTuple

#: The largest document accepted (a JWK Set of a hundred RSA keys is about 60 KB).
MAX_DOCUMENT_BYTES = 1 << 20


class FetchError(Exception):
    """The fetch failed; the message says why (never a secret: URLs here carry none)."""


class _Watchdog:
    """Shuts down the sockets of one fetch when its deadline passes, so a blocked read ends."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.expired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    # The socket object itself: urllib drops the connection's reference once the headers are
    # in, while the response goes on reading through it.
    with contextlib.suppress(OSError):  # already closed
        sock.shutdown(socket.SHUT_RDWR)


def _deadline_class(
    base: type[http.client.HTTPConnection], watchdog: _Watchdog
) -> type[http.client.HTTPConnection]:
    class DeadlineConnection(base):  # type: ignore[misc, valid-type]
        def connect(self) -> None:
            remaining = watchdog.remaining()
            if remaining <= 0:
                raise TimeoutError("deadline passed before connecting")
            self.timeout = remaining
            super().connect()
            watchdog.track(self.sock)

    return DeadlineConnection


class _SameSchemeRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        if req.get_method() == "POST":  # would be followed as a GET, without the form
            raise urllib.error.HTTPError(
                req.full_url, code, "redirect of a POST refused", headers, fp
            )
        if urllib.parse.urlsplit(newurl).scheme != urllib.parse.urlsplit(req.full_url).scheme:
            raise urllib.error.HTTPError(
                req.full_url, code, "redirect to another scheme refused", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(watchdog: _Watchdog) -> urllib.request.OpenerDirector:
    class HTTPHandler(urllib.request.HTTPHandler):
        def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
            return super().do_open(_deadline_class(http_class, watchdog), req, **kwargs)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
            return super().do_open(_deadline_class(http_class, watchdog), req, **kwargs)

    return urllib.request.build_opener(HTTPHandler, HTTPSHandler, _SameSchemeRedirects)


def _cause(exc: BaseException) -> str:
    """What went wrong, for the operator: the HTTP status, ``connection refused``, ..."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}" + (f" ({exc.reason})" if exc.reason else "")
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(reason, socket.gaierror):
        return f"name resolution failed ({reason.strerror})"
    if isinstance(reason, BaseException) and reason is not exc:
        return f"{type(reason).__name__}: {str(reason)[:200]}"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


class Answer(NamedTuple):
    """A successful (2xx) answer: its media type (lower case, no parameters) and body."""

    content_type: str
    body: bytes


def _send(request: urllib.request.Request, *, timeout: float, max_bytes: int) -> Answer:
    watchdog = _Watchdog(time.monotonic() + timeout)
    timer = threading.Timer(timeout, watchdog.expire)
    timer.daemon = True
    timer.start()
    try:
        with _opener(watchdog).open(request, timeout=timeout) as response:
            body: bytes = response.read(max_bytes + 1)
            content_type = response.headers.get_content_type()
    except (OSError, ValueError, http.client.HTTPException) as exc:
        if watchdog.expired:
            raise FetchError(f"no complete answer within {timeout:g} s") from exc
        raise FetchError(_cause(exc)) from exc
    finally:
        timer.cancel()
    if watchdog.expired:  # the body ended as the watchdog fired: do not trust it
        raise FetchError(f"no complete answer within {timeout:g} s")
    if len(body) > max_bytes:
        raise FetchError(f"document larger than {max_bytes} bytes")
    return Answer(content_type.lower(), body)


def fetch(uri: str, *, timeout: float, max_bytes: int = MAX_DOCUMENT_BYTES) -> bytes:
    """GET ``uri`` and return the body, all within ``timeout`` seconds; FetchError otherwise.

    The caller has checked the URL (https, or http on localhost only)."""
    request = urllib.request.Request(uri, headers={"Accept": "application/json"})  # noqa: S310
    return _send(request, timeout=timeout, max_bytes=max_bytes).body


def post_form(
    uri: str,
    form: Mapping[str, str],
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float,
    max_bytes: int = MAX_DOCUMENT_BYTES,
) -> Answer:
    """POST ``form`` as ``application/x-www-form-urlencoded`` to ``uri`` (same deadline, size limit
    and redirect rule as :func:`fetch`); the answer, or FetchError (never with the form in it).

    A redirect of a POST is refused: urllib would follow it as a GET without the body."""
    body = urllib.parse.urlencode(form).encode("ascii")
    request = urllib.request.Request(  # noqa: S310 - the caller checked the URL
        uri,
        data=body,
        method="POST",
        headers={
            "Accept": "application/json",
            "Content-Type": "application/x-www-form-urlencoded",
            **(headers or {}),
        },
    )
    return _send(request, timeout=timeout, max_bytes=max_bytes)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """A JSON object from ``body``; FetchError if it is not one."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep to parse
        raise FetchError(f"not JSON ({type(exc).__name__})") from exc
    if not isinstance(document, dict):
        raise FetchError("not a JSON object")
    return document


def fetch_json(uri: str, *, timeout: float, max_bytes: int = MAX_DOCUMENT_BYTES) -> dict[str, Any]:
    """:func:`fetch`, then parse a JSON object; FetchError if it is not one."""
    return parse_json_object(fetch(uri, timeout=timeout, max_bytes=max_bytes))
