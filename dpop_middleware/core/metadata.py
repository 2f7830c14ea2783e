"""OAuth 2.0 Protected Resource Metadata (RFC 9728): the document, where it lives, and its reply.

The rules, before any code:

* The document is the ``resource_metadata`` setting as given (every RFC 9728 section 2 member
  we know is type-checked at start-up, other members pass through as JSON values), plus three
  members the middleware derives from its own settings so they can never disagree with what it
  enforces: ``dpop_signing_alg_values_supported`` (``algorithms``),
  ``dpop_bound_access_tokens_required`` (true unless ``mode`` is ``dpop_or_bearer``) and
  ``bearer_methods_supported`` (``["header"]``: tokens in the query or body are refused).
* Where (section 3.1): ``/.well-known/oauth-protected-resource`` inserted between the host and
  the path of ``resource``, a terminating ``/`` after the host removed first:
  ``https://tools.example/mcp`` is described at
  ``https://tools.example/.well-known/oauth-protected-resource/mcp``.
* The well-known path is relative to the host root, so it is matched against the whole path as
  the server saw it: the mount prefix (ASGI ``root_path``, WSGI ``SCRIPT_NAME``) followed by the
  path the application routes on, decoded, compared exactly (no normalisation, no trailing-slash
  or case folding). A middleware mounted under a prefix only sees that path if the outer app
  routes it there. With a ``public_url`` whose prefix a proxy strips, the proxy must forward the
  host-root well-known path unchanged.
* ``GET`` and ``HEAD`` get ``200`` ``application/json`` without authentication, with
  ``Access-Control-Allow-Origin: *`` (the document is public; no credentials are involved); an
  ``OPTIONS`` request (a CORS preflight) gets ``200`` with the allowed methods and any request
  header; any other method ``405``.
* Section 5.1: every ``401``/``403`` challenge carries ``resource_metadata="<the document URL>"``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

from dpop_middleware.core.request import RequestInfo
from dpop_middleware.errors import ConfigurationError

WELL_KNOWN = "/.well-known/oauth-protected-resource"
_KEY = "resource_metadata"
#: Members the middleware fills in from its own settings (and so refuses in the setting).
DERIVED = (
    "dpop_signing_alg_values_supported",
    "dpop_bound_access_tokens_required",
    "bearer_methods_supported",
)
_LOCAL = ("localhost", "127.0.0.1", "::1")
_URLS = ("jwks_uri", "resource_documentation", "resource_policy_uri", "resource_tos_uri")
_STRING_LISTS = (
    "scopes_supported",
    "resource_signing_alg_values_supported",
    "authorization_details_types_supported",
)
_HUMAN = ("resource_name", "resource_documentation", "resource_policy_uri", "resource_tos_uri")
_ALLOWED_METHODS = "GET, HEAD, OPTIONS"


class Reply(NamedTuple):
    """A complete response the middleware gives itself (not a refusal)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class ResourceMetadata:
    """The validated ``resource_metadata`` setting."""

    #: The members as given (validated), without the derived ones.
    members: Mapping[str, Any]
    resource: str
    #: The well-known path from the host root, percent-encoded as in ``resource``.
    path: str
    #: The document's absolute URL (what goes into ``resource_metadata="..."``).
    url: str

    @property
    def origin(self) -> str:
        parts = urlsplit(self.resource)
        return f"{parts.scheme}://{parts.netloc}"


def _fail(key: str, value: Any, allowed: str) -> ConfigurationError:
    shown = repr(value)
    if len(shown) > 120:
        shown = shown[:117] + "..."
    return ConfigurationError(f"dpop_middleware setting {key!r}: got {shown}; allowed: {allowed}")


def _url(key: str, value: Any, *, identifier: bool) -> str:
    """An https URL (http only on localhost); an identifier has no query and no fragment."""
    allowed = "an https:// URL (http:// only for localhost)" + (
        " without query or fragment" if identifier else ""
    )
    if not isinstance(value, str) or any(c.isspace() or c in '"\\' for c in value):
        raise _fail(key, value, allowed)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise _fail(key, value, allowed) from None
    local = parts.hostname in _LOCAL
    if (
        not parts.hostname
        or parts.username is not None
        or not (parts.scheme == "https" or (parts.scheme == "http" and local))
        or (identifier and ("#" in value or "?" in value))
    ):
        raise _fail(key, value, allowed)
    return value


def _json_value(key: str, value: Any) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        raise _fail(key, value, "a JSON value (str, number, bool, None, list, dict)") from None


def _member(name: str, value: Any) -> None:
    key = f"{_KEY}.{name}"
    base = name.split("#", 1)[0]  # "resource_name#fr": a language-tagged human-readable member
    if "#" in name and base not in _HUMAN:
        raise _fail(key, value, f"language tags only on {', '.join(_HUMAN)}")
    if base in _URLS:
        _url(key, value, identifier=base == "jwks_uri")
    elif base in _STRING_LISTS:
        if (
            isinstance(value, str)
            or not isinstance(value, list | tuple)
            or not all(isinstance(v, str) and v and " " not in v for v in value)
        ):
            raise _fail(key, value, "a list of non-empty strings without spaces")
        if base == "resource_signing_alg_values_supported" and "none" in value:
            raise _fail(key, value, "signature algorithms other than 'none' (RFC 9728 section 2)")
    elif base == "resource_name" or base == "signed_metadata":
        if not isinstance(value, str) or not value:
            raise _fail(key, value, "a non-empty string")
    elif base == "tls_client_certificate_bound_access_tokens":
        if not isinstance(value, bool):
            raise _fail(key, value, "True or False")
    elif isinstance(value, float) and not math.isfinite(value):
        raise _fail(key, value, "a JSON value (finite numbers only)")
    _json_value(key, value)


def well_known_path(resource: str) -> str:
    """RFC 9728 section 3.1: the well-known string between host and path (a terminating ``/``
    after the host removed)."""
    path = urlsplit(resource).path
    return WELL_KNOWN + ("" if path in ("", "/") else path)


def parse_resource_metadata(value: Any) -> ResourceMetadata | None:
    """Validate the ``resource_metadata`` setting (None: off)."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _fail(
            _KEY,
            value,
            "None (off) or a dict with 'resource' and 'authorization_servers' and optional "
            "RFC 9728 members, e.g. 'scopes_supported', 'resource_name'",
        )
    for required in ("resource", "authorization_servers"):
        if required not in value:
            raise ConfigurationError(
                f"dpop_middleware setting '{_KEY}.{required}' is missing: RFC 9728 metadata needs "
                "'resource' (this API's https URL) and 'authorization_servers' (issuer URLs)"
            )
    derived = [name for name in DERIVED if name in value]
    if derived:
        raise ConfigurationError(
            f"dpop_middleware setting '{_KEY}.{derived[0]}' is set by the middleware from its own "
            "settings ('algorithms', 'mode'); leave it out"
        )
    resource = _url(f"{_KEY}.resource", value["resource"], identifier=True)
    servers = value["authorization_servers"]
    if isinstance(servers, str) or not isinstance(servers, list | tuple) or not servers:
        raise _fail(
            f"{_KEY}.authorization_servers", servers, "a non-empty list of issuer URLs (https)"
        )
    for server in servers:
        _url(f"{_KEY}.authorization_servers", server, identifier=True)
    members: dict[str, Any] = {"resource": resource, "authorization_servers": list(servers)}
    for name, member in value.items():
        if name not in members:
            _member(name, member)
            members[name] = list(member) if isinstance(member, tuple) else member
    path = well_known_path(resource)
    parts = urlsplit(resource)
    return ResourceMetadata(members, resource, path, f"{parts.scheme}://{parts.netloc}{path}")


def document(
    metadata: ResourceMetadata, algorithms: tuple[str, ...], bound_required: bool
) -> bytes:
    """The JSON document: the configured members and the three derived ones."""
    body = dict(metadata.members)
    body["dpop_signing_alg_values_supported"] = list(algorithms)
    body["dpop_bound_access_tokens_required"] = bound_required
    body["bearer_methods_supported"] = ["header"]
    return json.dumps(body, separators=(",", ":")).encode()


class MetadataEndpoint:
    """Answers requests for the metadata document; built once, looked up per request."""

    def __init__(
        self, metadata: ResourceMetadata, algorithms: tuple[str, ...], bound_required: bool
    ) -> None:
        self._path = unquote(metadata.path)
        body = document(metadata, algorithms, bound_required)
        cors = ("access-control-allow-origin", "*")
        # The adapters add Content-Length (of the GET body for HEAD) and drop a HEAD body.
        self._ok = Reply(200, (("content-type", "application/json"), cors), body)
        self._preflight = Reply(
            200,
            (
                cors,
                ("access-control-allow-methods", _ALLOWED_METHODS),
                ("access-control-allow-headers", "*"),
                ("access-control-max-age", "86400"),
                ("allow", _ALLOWED_METHODS),
            ),
            b"",
        )
        self._not_allowed = Reply(
            405,
            (("content-type", "application/json"), cors, ("allow", _ALLOWED_METHODS)),
            b'{"error":"method_not_allowed"}',
        )

    def matches(self, request: RequestInfo) -> bool:
        """The request is for the document: mount prefix + routed path, exactly."""
        root = request.root_path
        if not root:
            return request.route_path == self._path
        return unquote(root) + request.route_path == self._path

    def reply(self, request: RequestInfo) -> Reply | None:
        """The document reply for ``request``, or None when it is not for the document."""
        if not self.matches(request):
            return None
        method = request.method
        if method in ("GET", "HEAD"):
            return self._ok
        if method == "OPTIONS":
            return self._preflight
        return self._not_allowed


__all__ = [
    "WELL_KNOWN",
    "MetadataEndpoint",
    "Reply",
    "ResourceMetadata",
    "document",
    "parse_resource_metadata",
    "well_known_path",
]
