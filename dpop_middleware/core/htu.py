"""The request's ``htu``: which URI the client must have signed, and RFC 3986 normalisation.

Trust rules, before any code:

* By default the URI is built from what the server itself saw: the scheme of the connection, the
  ``Host`` header (validated against the RFC 3986 host grammar first, so a value like
  ``evil.example/path?`` or ``a@b`` can never produce a matching ``htu``), the mount prefix
  (``root_path`` / ``SCRIPT_NAME``) and the path.
* ``public_url`` fixes scheme, host and prefix for every request; the request cannot change them.
* ``Forwarded`` / ``X-Forwarded-Proto`` / ``X-Forwarded-Host`` / ``X-Forwarded-Prefix`` are
  believed only when the directly connected peer is in ``trusted_proxies``; from anyone else they
  are ignored. When a header carries a list, the last element (the one the trusted proxy itself
  added) is used.

Normalisation (RFC 9449 section 4.3 step 9 points to RFC 3986 sections 6.2.2 and 6.2.3): scheme
and host lower-cased, the default or an empty port dropped, percent-escapes upper-cased and the
unreserved ones decoded, dot-segments removed, an empty path made ``/``. The path keeps its case
and its trailing slash. Query and fragment are ignored.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Sequence
from typing import TypeVar, cast
from urllib.parse import quote

from dpop_middleware.core.request import RequestInfo
from dpop_middleware.errors import InvalidDPoPProofError, InvalidRequestError

_DEFAULT_PORTS = {"http": "80", "https": "443"}
#: Request headers some servers turn into the mount prefix (gunicorn's ``SCRIPT_NAME``, as a WSGI
#: environ key ``HTTP_SCRIPT_NAME``; daphne's ``Daphne-Root-Path``).
_PREFIX_HEADERS = frozenset({"script-name", "daphne-root-path"})
# RFC 3986 section 3.2.2, restricted to what a real HTTP host is: a name of letters, digits, "-",
# "." and "_" (reg-name allows "_", and container service names use it), IPv4, or an IPv6
# literal in brackets; then an optional port. No "@", "/", "?", "#" or "%" can get through.
_HOST_RE = re.compile(
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_](?:[A-Za-z0-9\-._]*[A-Za-z0-9_])?)(?::(?P<port>[0-9]{0,5}))?"
)
_URI_RE = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<authority>[^/?#]*)(?P<path>[^?#]*)"
)
# A percent-escape, or a "%" that starts none (not a valid URI character, RFC 3986 section 2.4).
_PCT_RE = re.compile(r"%([0-9A-Fa-f]{2})?")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters a path may hold as they are (RFC 3986 pchar + "/"), plus "%" for escapes.
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"


def _pct(match: re.Match[str]) -> str:
    digits = match.group(1)
    if digits is None:
        # A stray "%" is the character itself: encoded, so that decoding a neighbouring escape
        # cannot make a new one ("%f%42" -> "%25fB", not "%fB", which a second pass would read
        # as "%FB"). This keeps normalisation idempotent, which the verifier relies on.
        return "%25"
    char = chr(int(digits, 16))
    return char if char in _UNRESERVED else "%" + digits.upper()


def remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4 for an absolute path, in one pass over its segments.

    (The RFC's loop copies the rest of the string at every segment: quadratic in the path.)
    Same results: a ``.`` or ``..`` last segment leaves a trailing slash, and ``..`` above the
    root stays at the root. Every path here is empty or starts with ``/`` (a request path that
    does not is refused, and a URI's path follows its authority); ValueError for any other.
    """
    if "." not in path:
        return path
    if path[0] != "/":
        raise ValueError("not an absolute path")
    segments = path.split("/")
    out: list[str] = []
    for segment in segments[1:]:  # segments[0] is the empty string before the leading "/"
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    if segments[-1] in (".", ".."):
        out.append("")
    return "/" + "/".join(out)


# Normalisation is a pure function of its string input and the same few URIs come back on every
# request, so results are memoised (bounded, thread-safe): this takes it off the hot path. Only
# short inputs are memoised, so the memo holds at most _MEMO_SIZE * _MEMO_CHARS characters of
# input (and about as much output) however long the paths an attacker sends: longer inputs are
# worked out each time (linear in their length).
_MEMO_SIZE = 4096
_MEMO_CHARS = 512
_F = TypeVar("_F", bound=Callable[..., str])


def _memo(function: _F) -> _F:
    cached = functools.lru_cache(maxsize=_MEMO_SIZE)(function)

    @functools.wraps(function)
    def call(*args: str) -> str:
        if sum(map(len, args)) <= _MEMO_CHARS:
            return cached(*args)
        return function(*args)

    call.cache_info = cached.cache_info  # type: ignore[attr-defined]
    return cast(_F, call)


@_memo
def normalize_path(path: str) -> str:
    """Percent-encoding and dot-segment normalisation of a path (case and trailing slash kept)."""
    # Encode whatever is not allowed as-is (spaces, non-ASCII) the way a client would, keep
    # existing escapes, then normalise the escapes (RFC 3986 section 6.2.2.2).
    path = quote(path, safe=_PATH_SAFE)
    path = _PCT_RE.sub(_pct, path)
    path = remove_dot_segments(path)
    return path or "/"


def split_host(value: str) -> tuple[str, str | None]:
    """Validate a ``Host``-like value; return (lower-cased host, port or None). ValueError if bad."""
    match = _HOST_RE.fullmatch(value)
    if match is None:
        raise ValueError("not a valid host")
    host = match.group("host").lower()
    if host.startswith("["):
        ipaddress.IPv6Address(host[1:-1])  # raises ValueError
    return host, match.group("port")


@_memo
def _authority(scheme: str, host_value: str) -> str:
    host, port = split_host(host_value)
    if port and int(port) > 65535:
        raise ValueError("port out of range")
    if not port or port.lstrip("0") == _DEFAULT_PORTS.get(scheme, "").lstrip("0"):
        return host
    return f"{host}:{int(port)}"


@_memo
def normalize_uri(uri: str) -> str:
    """Normalise an absolute http(s) URI for comparison, dropping query and fragment.

    Raises ValueError for anything that is not an absolute http(s) URI with a valid host and no
    user information.
    """
    match = _URI_RE.match(uri)
    if match is None:
        raise ValueError("not an absolute URI")
    scheme = match.group("scheme").lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError("not an http(s) URI")
    authority = _authority(scheme, match.group("authority"))
    return f"{scheme}://{authority}{normalize_path(match.group('path'))}"


def normalize_base_url(url: str) -> tuple[str, str, str]:
    """Split a ``public_url`` into (scheme, authority, prefix without trailing slash)."""
    if "?" in url or "#" in url:
        raise ValueError("query or fragment")
    normal = normalize_uri(url)
    scheme, rest = normal.split("://", 1)
    slash = rest.find("/")
    return scheme, rest[:slash], rest[slash:].rstrip("/")


def _last(value: str) -> str:
    return value.rsplit(",", 1)[-1].strip()


def _forwarded(value: str) -> dict[str, str]:
    """The last element of an RFC 7239 ``Forwarded`` header, as a dict of lower-cased keys."""
    out: dict[str, str] = {}
    for pair in _last(value).split(";"):
        name, sep, val = pair.partition("=")
        if sep:
            out[name.strip().lower()] = val.strip().strip('"')
    return out


def _trusted(
    ip: str | None, proxies: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    if not ip or not proxies:
        return False
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in proxies)


def request_htu(
    request: RequestInfo,
    host_values: Sequence[str],
    public_url: tuple[str, str, str | None] | None,
    trusted_proxies: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> str:
    """The normalised URI this request was sent to, as the client should have put it in ``htu``.

    ``host_values`` are the request's ``Host`` header values (found in the credentials pass).
    A path that does not start with ``/`` (a server passing on ``x.evil/items``, ``:8443/items``
    or an absolute-form target as the path) would be glued onto the authority and name another
    host or port: it is refused, never composed.
    """
    path = request.path
    if path and path[0] != "/":
        raise InvalidRequestError(
            "invalid_path", "The request target is not an absolute path",
            log_detail={"path": path},
        )  # fmt: skip
    if public_url is not None:
        scheme, authority, fixed = public_url
        if fixed is not None:
            return f"{scheme}://{authority}{normalize_path(fixed + path)}"
        # Scheme and host fixed, the mount prefix the server's (forwarded headers ignored).
        prefix = request.root_path
        if prefix:
            _check_prefix(request, prefix, trusted=False)
        return f"{scheme}://{authority}{normalize_path(prefix + path)}"

    scheme = request.scheme.lower()
    if len(host_values) > 1:
        raise InvalidRequestError("invalid_host", "More than one Host header")
    host = host_values[0] if host_values else None
    prefix = request.root_path

    trusted = bool(trusted_proxies) and _trusted(request.client_ip, trusted_proxies)
    if trusted:
        fwd_values = request.header_values("forwarded")
        if fwd_values:
            fwd = _forwarded(fwd_values[-1])
            scheme = fwd.get("proto", scheme).lower()
            host = fwd.get("host", host)
        else:
            proto = request.header_values("x-forwarded-proto")
            if proto:
                scheme = _last(proto[-1]).lower()
            fhost = request.header_values("x-forwarded-host")
            if fhost:
                host = _last(fhost[-1])
        fprefix = request.header_values("x-forwarded-prefix")
        if fprefix:
            prefix = _last(fprefix[-1]).rstrip("/")

    if prefix:
        _check_prefix(request, prefix, trusted=trusted)
    if scheme not in _DEFAULT_PORTS:
        raise InvalidRequestError("invalid_host", "Unsupported request scheme")
    if host is None and request.server is not None:
        name, port = request.server
        host = name if port is None else f"{name}:{port}"
    if not host:
        raise InvalidRequestError("invalid_host", "The request has no Host header")
    try:
        if len(host) + len(prefix) + len(path) <= _MEMO_CHARS:  # _memo's rule, inline
            return _compose_memo(scheme, host, prefix, path)
        return _compose(scheme, host, prefix, path)
    except ValueError:
        raise InvalidRequestError(
            "invalid_host", "The Host header is not a valid host", log_detail={"host": host}
        ) from None


def _check_prefix(request: RequestInfo, prefix: str, *, trusted: bool) -> None:
    """The mount prefix starts with ``/``, and a client did not name it.

    Servers that take the mount prefix from a request header (gunicorn's SCRIPT_NAME from its
    forwarded_allow_ips, 127.0.0.1 by default; daphne's Daphne-Root-Path from anyone) let the
    client move the split between prefix and path: the same htu would then route to another
    handler. Only a trusted proxy may send them.
    """
    if not trusted:
        for name, _ in request.headers:  # one pass, on every request of a mounted app
            if name in _PREFIX_HEADERS:
                raise InvalidRequestError(
                    "untrusted_mount_prefix",
                    "The request names its own mount prefix",
                    log_detail={"header": name},
                )
    if prefix[0] != "/":
        raise InvalidRequestError(
            "invalid_path", "The request prefix is not an absolute path",
            log_detail={"prefix": prefix},
        )  # fmt: skip


def _compose(scheme: str, host: str, prefix: str, path: str) -> str:
    """The normalised ``scheme://authority/prefix/path`` (ValueError for a bad host)."""
    return f"{scheme}://{_authority(scheme, host)}{normalize_path(prefix + path)}"


#: One C-level memo lookup per request for what is the same few strings on every request
#: (called directly, without :func:`_memo`'s wrapper, when the inputs are short: the hot path).
_compose_memo = functools.lru_cache(maxsize=_MEMO_SIZE)(_compose)


def check_htu(claimed: str, expected: str) -> None:
    """RFC 9449 section 4.3 step 9: ``htu`` matches the request URI, query and fragment ignored."""
    try:
        normal = normalize_uri(claimed)
    except ValueError:
        raise InvalidDPoPProofError(
            "htu_invalid", "DPoP proof htu is not an absolute http(s) URI"
        ) from None
    if normal != expected:
        raise InvalidDPoPProofError(
            "htu_mismatch",
            "DPoP proof htu does not match the request URI",
            log_detail={"expected_htu": expected, "received_htu": normal},
        )
