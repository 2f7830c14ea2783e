"""DPoP for HTTP clients: httpx and requests auth that sign a fresh proof for every request.

Each request gets a new proof for its own method and URL (RFC 9449 section 4), with ``ath`` for
the access token, and ``Authorization: DPoP <token>``. Nonces (RFC 9449 sections 8 and 9) are
handled for you:

* the latest ``DPoP-Nonce`` seen on any response from a server (a 200 too) goes into the next
  proof sent to that server (remembered per origin: a nonce is only good where it was issued);
* a refusal that asks for a nonce is retried once with it: a resource server's 401 with
  ``error="use_dpop_nonce"`` in ``WWW-Authenticate`` (section 9), or an authorization server's
  400 carrying a new ``DPoP-Nonce`` (section 8, where the error is in the body).

httpx::

    from dpop_middleware.client import HttpxDPoPAuth
    from dpop_middleware.testing import DPoPKey
    key = DPoPKey.generate()                       # the key the token is bound to
    auth = HttpxDPoPAuth(key, access_token=token)  # one object: httpx.Client and AsyncClient
    httpx.get("https://api.example/items", auth=auth)

requests::

    from dpop_middleware.client import RequestsDPoPAuth
    from dpop_middleware.testing import DPoPKey
    key = DPoPKey.generate()
    auth = RequestsDPoPAuth(key, access_token=token)
    requests.get("https://api.example/items", auth=auth)

Without ``access_token`` the helpers sign proofs only (no ``ath``, no ``Authorization``): that is
what a token request to the authorization server carries. Set ``auth.access_token`` when the
token is refreshed.

httpx and requests are optional dependencies: each helper exists when its library is installed,
and asking for it otherwise raises an ImportError that names the package to install.
Redirects are followed by the HTTP library with the first request's proof, whose ``htu`` no longer
matches: a DPoP-protected API should not redirect, or the client should not follow.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Mapping
from typing import Any
from urllib.parse import urlsplit

from dpop_middleware.testing import DPoPKey

# RFC 6750 section 3: the error attribute of the challenge, quoted or as a token.
_USE_DPOP_NONCE = re.compile(r'(?:^|[\s,])error\s*=\s*(?:"use_dpop_nonce"|use_dpop_nonce\b)', re.I)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


class DPoPAuthBase:
    """What both helpers share: the key, the token, and the latest nonce of each server."""

    def __init__(self, key: DPoPKey, access_token: str | None = None) -> None:
        self.key = key
        self.access_token = access_token
        #: Latest ``DPoP-Nonce`` per origin (``scheme://host:port``).
        self.nonces: dict[str, str] = {}

    def headers_for(self, method: str, url: str) -> dict[str, str]:
        """A fresh proof for ``method`` ``url`` (and the token): the headers to send."""
        proof = self.key.proof(
            method, url, access_token=self.access_token, nonce=self.nonces.get(_origin(url))
        )
        if self.access_token is None:
            return {"DPoP": proof}
        return {"Authorization": f"DPoP {self.access_token}", "DPoP": proof}

    def observe(self, url: str, status: int, headers: Mapping[str, str]) -> bool:
        """Remember the response's ``DPoP-Nonce``; True if the server refused for want of it."""
        nonce = headers.get("dpop-nonce")
        if not nonce:
            return False
        origin = _origin(url)
        sent = self.nonces.get(origin)
        self.nonces[origin] = nonce
        if status == 401:
            return _USE_DPOP_NONCE.search(headers.get("www-authenticate", "")) is not None
        return status == 400 and nonce != sent


_MISSING = {
    "HttpxDPoPAuth": "httpx",
    "Httpx2DPoPAuth": "httpx2",
    "RequestsDPoPAuth": "requests",
}

try:
    import httpx
except ImportError:  # httpx is optional: HttpxDPoPAuth is then missing (see __getattr__)
    pass
else:

    class HttpxDPoPAuth(DPoPAuthBase, httpx.Auth):
        """``httpx.Auth`` for DPoP; the same object works with ``Client`` and ``AsyncClient``."""

        def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
            url = str(request.url)
            request.headers.update(self.headers_for(request.method, url))
            response = yield request
            if self.observe(url, response.status_code, response.headers):
                request.headers.update(self.headers_for(request.method, url))
                response = yield request
                self.observe(url, response.status_code, response.headers)


try:
    import httpx2
except ImportError:  # httpx2 (the MCP SDK 2's HTTP client) is optional: see __getattr__
    pass
else:

    class Httpx2DPoPAuth(DPoPAuthBase, httpx2.Auth):
        """The same auth for ``httpx2`` (the HTTP client of the MCP Python SDK 2)."""

        def auth_flow(self, request: httpx2.Request) -> Generator[httpx2.Request, httpx2.Response]:
            url = str(request.url)
            request.headers.update(self.headers_for(request.method, url))
            response = yield request
            if self.observe(url, response.status_code, response.headers):
                request.headers.update(self.headers_for(request.method, url))
                response = yield request
                self.observe(url, response.status_code, response.headers)


try:
    import requests
    from requests.cookies import extract_cookies_to_jar
except ImportError:  # requests is optional: RequestsDPoPAuth is then missing (see __getattr__)
    pass
else:

    class RequestsDPoPAuth(DPoPAuthBase, requests.auth.AuthBase):
        """``requests`` auth for DPoP: signs each request; a response hook retries once."""

        def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
            assert r.method is not None and r.url is not None
            r.headers.update(self.headers_for(r.method, r.url))
            # A file body is read by the first send: note where it starts, to resend it.
            tell = getattr(r.body, "tell", None)
            start = tell() if callable(tell) else None

            def on_response(response: requests.Response, **kwargs: Any) -> requests.Response:
                return self._on_response(response, start, **kwargs)

            r.register_hook("response", on_response)
            return r

        def _on_response(
            self, response: requests.Response, start: int | None, **kwargs: Any
        ) -> requests.Response:
            sent = response.request
            assert sent.method is not None and sent.url is not None
            if not self.observe(sent.url, response.status_code, response.headers):
                return response
            # As requests' own HTTPDigestAuth does: drain, then resend on the same adapter.
            _ = response.content
            response.close()
            retry = sent.copy()
            if start is not None:
                retry.body.seek(start)  # type: ignore[union-attr]
            if retry._cookies is not None:
                extract_cookies_to_jar(retry._cookies, sent, response.raw)
                retry.prepare_cookies(retry._cookies)
            assert retry.method is not None and retry.url is not None
            retry.headers.update(self.headers_for(retry.method, retry.url))
            second: requests.Response = response.connection.send(retry, **kwargs)
            second.history.append(response)
            second.request = retry
            self.observe(retry.url, second.status_code, second.headers)
            return second


def __getattr__(name: str) -> Any:
    if name in _MISSING:
        package = _MISSING[name]
        raise ImportError(f"dpop_middleware.client.{name} needs {package}: pip install {package}")
    raise AttributeError(f"module 'dpop_middleware.client' has no attribute {name!r}")


__all__ = ["DPoPAuthBase", "Httpx2DPoPAuth", "HttpxDPoPAuth", "RequestsDPoPAuth"]
