"""Path rules: which request paths the middleware works on, and how path settings match.

The rule, before any code: **the middleware judges the path exactly as the application will
route it.** Servers hand the application a decoded path (ASGI ``path``, WSGI ``PATH_INFO``) and
routers match that string as it is: no server or router here removes dot-segments, so
``/files/../health`` reaches a ``/files/{p:path}`` route with ``p="../health"``. Two
consequences:

* A request path holding a ``.`` or ``..`` segment, literal or percent-encoded in any case
  (``%2e``, ``%2E``), decoded or not, is refused (400 ``invalid_request``, reason
  ``dot_segment_path``): what such a path names depends on who normalises it. Honest clients
  remove dot-segments before sending (RFC 3986 section 5.2.4); browsers and HTTP libraries do.
* ``exclude_paths`` and ``nonce.required`` match the decoded path the application routes on
  (``RequestInfo.route_path``), by whole segments and case-sensitively, never a normalised
  copy: ``/api%2Fx`` is routed as ``/api/x`` and is under ``/api``.

A routed path that starts with ``//`` (``//api/x``, ``/%2Fapi/x``) is refused too (400, reason
``double_slash_path``): werkzeug (Flask) strips leading slashes before matching, so it routes
``//api/x`` as ``/api/x``, while Starlette and Django route it as a path of its own. No one
reading can be right for every app.

Paths longer than ``max_path_length`` are refused before any other work (400, reason
``path_too_long``), so no per-request cost grows with an attacker's path.
"""

from __future__ import annotations

import re

from dpop_middleware.errors import InvalidRequestError

#: A "." or ".." segment in a decoded path.
_DOT_DECODED = re.compile(r"(?:^|/)\.\.?(?:/|$)")
#: The same in a percent-encoded path: each dot literal or %2E in any case.
_DOT_ENCODED = re.compile(r"(?:^|/)(?:\.|%2[eE]){1,2}(?:/|$)")


def check_path(path: str, route_path: str, max_length: int) -> None:
    """Refuse a request path the middleware must not judge (see the module docstring).

    ``path`` is the percent-encoded path as sent (where the server gives it), ``route_path`` the
    decoded one the application routes on.
    """
    if len(path) > max_length or len(route_path) > max_length:
        raise InvalidRequestError(
            "path_too_long", "The request path is too long", log_detail={"length": str(len(path))}
        )
    if route_path[:2] == "//":
        raise InvalidRequestError(
            "double_slash_path",
            "The request path starts with an empty segment",
            log_detail={"path": path},
        )
    # Cheap pre-checks first: most paths hold no "." at all, and no "%2" outside escapes.
    if ("." in route_path and _DOT_DECODED.search(route_path)) or (
        ("." in path or "%2" in path) and _DOT_ENCODED.search(path)
    ):
        raise InvalidRequestError(
            "dot_segment_path",
            "The request path holds a dot-segment",
            log_detail={"path": path},
        )


def under(route_path: str, prefixes: tuple[str, ...]) -> bool:
    """``route_path`` is one of ``prefixes`` or below one, by whole segments, compared as the
    application routes it (no normalisation): ``/admin`` covers ``/admin`` and ``/admin/x``,
    never ``/administrator``. Prefixes come from settings without a trailing slash (``/`` alone
    covers every path)."""
    for prefix in prefixes:
        if route_path == prefix or route_path.startswith(prefix if prefix == "/" else prefix + "/"):
            return True
    return False


def has_dot_segment(path: str) -> bool:
    """For settings: a configured path must not hold a dot-segment (it could never match)."""
    return bool(_DOT_DECODED.search(path))
