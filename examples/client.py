"""A DPoP client for the examples: mints a bound token with the local issuer and calls a URL.

    .venv/bin/python -m examples.client http://127.0.0.1:8000/me

It makes a fresh key, gets a token bound to it (``cnf.jkt``), sends ``Authorization: DPoP <token>``
with a one-time proof for ``GET <url>``, and retries once with the server's nonce if asked to
(``use_dpop_nonce``, RFC 9449 section 8). Run it on the machine that runs the server: both read
the issuer key file of :mod:`examples.local_issuer`.
"""

from __future__ import annotations

import http.client
import sys
from urllib.parse import urlsplit

from dpop_middleware.testing import DPoPKey
from examples.local_issuer import issuer


def call(
    url: str, method: str = "GET", *, key: DPoPKey | None = None, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """Send one DPoP request (two if the server asks for a nonce); return status, headers, body."""
    key = key or DPoPKey.generate()
    token = issuer.token(bound_to=key)
    parts = urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    nonce: str | None = None
    for _ in range(2):
        proof = key.proof(method, url, access_token=token, nonce=nonce)
        conn_class = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        conn = conn_class(parts.netloc, timeout=timeout)
        try:
            conn.request(method, target, headers={"Authorization": f"DPoP {token}", "DPoP": proof})
            response = conn.getresponse()
            status, body = response.status, response.read()
            headers = {name.lower(): value for name, value in response.getheaders()}
        finally:
            conn.close()
        challenge = headers.get("www-authenticate", "")
        if status == 401 and "use_dpop_nonce" in challenge and nonce is None:
            nonce = headers.get("dpop-nonce")
            continue
        break
    return status, headers, body


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(__doc__)
        return 2
    status, headers, body = call(*argv)
    print(status)
    for name in ("www-authenticate", "dpop-nonce"):
        if name in headers:
            print(f"{name}: {headers[name]}")
    print(body.decode("utf-8", "replace"))
    return 0 if status < 400 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
