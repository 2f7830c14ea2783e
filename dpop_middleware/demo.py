"""``python -m dpop_middleware.demo``: a legitimate client and an attacker against a live API.

Starts a small Starlette API behind :class:`~dpop_middleware.DPoPMiddleware` under uvicorn on a
free loopback port, with the embedded defaults (in-memory replay store, a local token issuer, no
outside service), then sends real HTTP requests with httpx and prints one row per scenario:
what was expected, what came back (status and the ``error`` of the ``WWW-Authenticate``
challenge), OK or FAIL, and the server's reason. It exits 1 if any row is not as expected, so it
doubles as a smoke test.

    --nonce      the server requires nonces: the handshake rows come first (RFC 9449 section 9)
    --redis URL  the replay store is Redis at URL instead of memory
    --log        also print the server's log line for each refusal

Needs starlette, uvicorn and httpx: ``pip install 'dpop-middleware[demo]'``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import re
import secrets
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from dpop_middleware.asgi import DPoPMiddleware
from dpop_middleware.errors import ConfigurationError
from dpop_middleware.replay import create_async_store
from dpop_middleware.settings import Settings
from dpop_middleware.testing import DPoPKey, TokenIssuer, serve

if TYPE_CHECKING:
    import httpx

DEMO_PACKAGES = ("starlette", "uvicorn", "httpx")
_PARAM = re.compile(r'(?P<name>[A-Za-z_]+)="(?P<value>[^"]*)"')


@dataclass(frozen=True, slots=True)
class Expect:
    """What a scenario should get: a status, the challenge's ``error``, a ``DPoP-Nonce`` or not."""

    status: int
    error: str | None = None
    nonce_header: bool = False

    def __str__(self) -> str:
        text = f"{self.status} {self.error}" if self.error else str(self.status)
        return text + " + DPoP-Nonce" if self.nonce_header else text


@dataclass(frozen=True, slots=True)
class Row:
    scenario: str
    expected: Expect
    got: Expect
    why: str = ""

    @property
    def ok(self) -> bool:
        # A DPoP-Nonce is checked only where one is expected: a 200 may carry the next nonce.
        want, got = self.expected, self.got
        return (got.status, got.error) == (want.status, want.error) and (
            got.nonce_header or not want.nonce_header
        )


def row_from(scenario: str, expected: Expect, response: httpx.Response) -> Row:
    """Read status, ``error``, ``error_description`` and ``DPoP-Nonce`` off a response.

    They come from the ``WWW-Authenticate`` challenge; a 503 has none, so its JSON body is read.
    """
    params = {
        m.group("name").lower(): m.group("value")
        for m in _PARAM.finditer(response.headers.get("www-authenticate", ""))
    }
    if "error" not in params and response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            params = {k: str(body[k]) for k in ("error", "error_description") if k in body}
    got = Expect(response.status_code, params.get("error"), "dpop-nonce" in response.headers)
    return Row(scenario, expected, got, params.get("error_description", ""))


def render(rows: Sequence[Row]) -> str:
    """The table: scenario, expected, got, OK/FAIL, and the server's error_description."""
    head = ("scenario", "expected", "got", "result", "why (server's error_description)")
    body = [
        (r.scenario, str(r.expected), str(r.got), "OK" if r.ok else "FAIL", r.why) for r in rows
    ]
    cells = [head, *body]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(4)) + "  " + c[4] for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(head[4]))
    return "\n".join(line.rstrip() for line in lines)


def _shown(url: str) -> str:
    """``url`` fit to print: a password in it is masked."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


def all_ok(rows: Sequence[Row]) -> bool:
    return bool(rows) and all(r.ok for r in rows)


def build_app(settings: dict[str, Any]) -> DPoPMiddleware:
    """The protected API: ``GET``/``DELETE /items`` and ``GET /admin``, DPoP on every path.

    The middleware gets its replay store from here so the app's lifespan can close it.
    """
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    frozen = Settings.from_dict(settings)
    store = create_async_store(frozen.replay_store, replay_ttl=frozen.replay_ttl)

    async def items(request: Request) -> JSONResponse:
        dpop = request.scope["dpop"]
        return JSONResponse({"items": ["apple", "pear"], "sub": dpop.subject, "jkt": dpop.jkt})

    async def admin(request: Request) -> JSONResponse:
        return JSONResponse({"admin": True})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await store.aclose()

    routes = [Route("/items", items, methods=["GET", "DELETE"]), Route("/admin", admin)]
    api = Starlette(routes=routes, lifespan=lifespan)
    return DPoPMiddleware(api, frozen, store=store)


def play(
    base_url: str, issuer: TokenIssuer, *, nonce: bool, break_expectation: bool = False
) -> list[Row]:
    """Alice (the legitimate client) and Mallory (who stole her token) against ``base_url``."""
    import httpx

    alice = DPoPKey.generate()
    mallory = DPoPKey.generate()
    token = issuer.token(bound_to=alice)
    items = f"{base_url}/items"
    rows: list[Row] = []
    server_nonce: str | None = None

    def signed(key: DPoPKey) -> dict[str, str]:
        """Headers for ``GET /items`` with a fresh proof by ``key``."""
        proof = key.proof("GET", items, access_token=token, nonce=server_nonce)
        return {"Authorization": f"DPoP {token}", "DPoP": proof}

    def check(
        scenario: str,
        expected: Expect,
        headers: dict[str, str],
        method: str = "GET",
        url: str = items,
    ) -> None:
        nonlocal server_nonce
        response = client.request(method, url, headers=headers)
        server_nonce = response.headers.get("dpop-nonce", server_nonce)
        rows.append(row_from(scenario, expected, response))

    refused_proof = Expect(401, "invalid_dpop_proof")
    refused_token = Expect(401, "invalid_token")
    with httpx.Client(timeout=5.0) as client:
        first = "legitimate request: GET /items"
        if nonce:
            asked = Expect(401, "use_dpop_nonce", nonce_header=True)
            check("nonce handshake: first request, no nonce", asked, signed(alice))
            first = "nonce handshake: retry with DPoP-Nonce"
        headers = signed(alice)
        check(first, Expect(200), headers)
        replay = Expect(200) if break_expectation else refused_proof
        check("same request replayed", replay, headers)
        check("stolen token, attacker's own key", refused_token, signed(mallory))
        check(
            "stolen token downgraded to Bearer", refused_token, {"Authorization": f"Bearer {token}"}
        )
        # Mallory intercepts proofs Alice signed but never sent, and points them elsewhere.
        admin = f"{base_url}/admin"
        check("proof for GET /items sent to GET /admin", refused_proof, signed(alice), url=admin)
        check("proof for GET /items sent as DELETE", refused_proof, signed(alice), method="DELETE")
        check("legitimate client again, fresh proof", Expect(200), signed(alice))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dpop_middleware.demo",
        description="A legitimate DPoP client and an attacker against a live protected API.",
    )
    parser.add_argument("--nonce", action="store_true", help="the server requires DPoP nonces")
    parser.add_argument(
        "--redis", metavar="URL", help="Redis replay store, e.g. redis://127.0.0.1:6379/0"
    )
    parser.add_argument("--log", action="store_true", help="print the server's refusal log lines")
    # For the test suite: expect the wrong answer in one row, to prove a FAIL exits non-zero.
    parser.add_argument("--break-expectation", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    missing = [name for name in DEMO_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"the demo needs {', '.join(DEMO_PACKAGES)} ({', '.join(missing)} missing): "
            "pip install 'dpop-middleware[demo]'",
            file=sys.stderr,
        )
        return 2
    server_log = logging.getLogger("dpop_middleware")
    if args.log:
        handler: logging.Handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("  server log: %(message)s"))
    else:
        handler = logging.NullHandler()  # keep the refusal lines out of the table
    server_log.addHandler(handler)

    started = time.perf_counter()
    issuer = TokenIssuer()
    store = args.redis or "memory://"
    extra: dict[str, Any] = {"replay_store": store}
    if args.nonce:
        extra["nonce"] = {"secret": secrets.token_bytes(32)}
    try:
        app = build_app(issuer.settings(**extra))
    except ConfigurationError as exc:
        print(f"cannot start the demo API: {exc}", file=sys.stderr)
        return 2
    with serve(app) as base_url:
        print(
            f"DPoP demo: API at {base_url}, replay store {_shown(store)}, "
            f"server nonces {'required' if args.nonce else 'off'}\n"
        )
        rows = play(base_url, issuer, nonce=args.nonce, break_expectation=args.break_expectation)
    print(render(rows))
    passed = sum(r.ok for r in rows)
    elapsed = time.perf_counter() - started
    print(f"\n{passed} of {len(rows)} rows as expected ({elapsed:.2f} s)")
    return 0 if all_ok(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
