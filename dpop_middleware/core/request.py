"""A neutral view of the request, built by the adapters, read by the core."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote, unquote_to_bytes


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What the core needs to know about one HTTP request.

    ``headers`` keeps every header line as sent (names lower-cased), duplicates included: RFC 9449
    section 4.3 requires refusing two ``DPoP`` headers, so nothing may collapse them.
    ``path`` is the path below the mount point and ``root_path`` the mount point, both in their
    percent-encoded form where the server gives it (ASGI ``raw_path``, WSGI ``RAW_URI``): the
    request URI (``htu``) is built from them. ``route_path`` is the decoded path below the mount
    point exactly as the application routes on it (ASGI ``path``, WSGI ``PATH_INFO``): path rules
    (``exclude_paths``, ``nonce.required``) match on it, so the middleware judges the request the
    application will act on. When not given it is ``path`` percent-decoded.
    """

    method: str
    scheme: str
    path: str
    headers: tuple[tuple[str, str], ...]
    root_path: str = ""
    query_string: str = ""
    client_ip: str | None = None
    server: tuple[str, int | None] | None = None
    route_path: str = ""

    def __post_init__(self) -> None:
        if not self.route_path:
            object.__setattr__(self, "route_path", unquote(self.path, errors="replace") or "/")

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name`` (lower-case), in order."""
        return [value for key, value in self.headers if key == name]


# Characters a path segment may hold unescaped (RFC 3986 pchar) plus "/"; "%" is escaped.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


def encoded_path(decoded: bytes, raw: str | None, root: str = "") -> str:
    """The percent-encoded form of a path the server decoded for us.

    Servers give the decoded path (ASGI ``path``, WSGI ``PATH_INFO``) and sometimes the raw one
    (ASGI ``raw_path``, WSGI ``RAW_URI``/``REQUEST_URI``), which may or may not include the mount
    prefix ``root``. The raw form is used when it is ASCII and decodes to the same path, so that
    what the client sent (e.g. ``%2F``) is compared as sent; otherwise the decoded path is
    re-encoded. "The same path" is the same bytes, or, for a server that decoded the path as
    UTF-8 with replacement (uvicorn, the werkzeug dev server: ``/a%FF`` reaches the app as
    ``/a\ufffd``), the same text decoded that way: re-encoding that text would give
    ``/a%EF%BF%BD``, which no honest client signed.
    """
    if raw is not None:
        raw = raw.split("?", 1)[0]
        if root and raw.startswith(root):
            raw = raw[len(root) :]
        if raw.isascii():
            sent = unquote_to_bytes(raw)
            if sent == decoded or (
                sent.decode("utf-8", "replace") == decoded.decode("utf-8", "replace")
            ):
                return raw
    return quote(decoded, safe=_PATH_SAFE)
