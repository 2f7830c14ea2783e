"""Test kit: client keys that mint DPoP proofs, a local access-token issuer, a live server.

Usable in your own tests (no authorization server needed)::

    key = DPoPKey.generate()                      # ES256 by default
    issuer = TokenIssuer()                         # its .jwks plugs into the "jwks" setting
    token = issuer.token(bound_to=key)             # RFC 9068 token with cnf.jkt = key.jkt
    proof = key.proof("GET", "https://api.example/items", access_token=token)
    headers = {"Authorization": f"DPoP {token}", "DPoP": proof}

``issuer.serve()`` runs a real authorization server (metadata, JWK Set, token endpoint with DPoP)
on loopback for clients that get their tokens themselves. ``DPoPKey`` and the clients that sign
every request for you (httpx, requests, and ``TokenClient``) are in :mod:`dpop_middleware.client`;
the pytest fixtures ``dpop_key`` and ``dpop_issuer`` in :mod:`dpop_middleware.pytest_plugin`.
This module needs only joserfc and cryptography; :func:`serve` imports uvicorn when called.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dpop_middleware.client import REMOVE, DPoPKey, _generate, _merge, ath_for, sign_compact


class TokenIssuer:
    """A local authorization server stand-in: a signing key, its JWK Set, RFC 9068 tokens."""

    def __init__(
        self,
        issuer: str = "https://issuer.example",
        audience: str = "https://api.example",
        *,
        alg: str = "ES256",
        kid: str = "test-key-1",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.alg = alg
        self.kid = kid
        self.clock = clock
        self.key = _generate(alg)
        #: Opaque tokens issued by :meth:`opaque_token`: token -> its introspection claims.
        self.opaque: dict[str, dict[str, Any]] = {}
        self.revoked: set[str] = set()

    @property
    def jwks(self) -> dict[str, Any]:
        """The public JWK Set, ready for the ``jwks`` setting."""
        jwk = dict(self.key.as_dict(private=False))
        jwk.update({"kid": self.kid, "use": "sig", "alg": self.alg})
        return {"keys": [jwk]}

    def settings(self, **extra: Any) -> dict[str, Any]:
        """A settings dict for the middleware that trusts this issuer."""
        return {"issuer": self.issuer, "audience": self.audience, "jwks": self.jwks, **extra}

    def token(
        self,
        *,
        bound_to: DPoPKey | str | None = None,
        lifetime: float = 300,
        claims: Mapping[str, Any] | None = None,
        header: Mapping[str, Any] | None = None,
    ) -> str:
        """An RFC 9068 access token valid for ``lifetime`` seconds from the issuer's clock.

        ``bound_to`` (a key or a thumbprint) sets ``cnf.jkt`` (RFC 9449 section 6.1); ``claims``
        and ``header`` override or add members (``REMOVE`` leaves one out).
        """
        now = int(self.clock())
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": "user-123",
            "client_id": "client-abc",
            "iat": now,
            "exp": now + int(lifetime),
            "jti": secrets.token_urlsafe(12),
            "scope": "read",
        }
        if bound_to is not None:
            jkt = bound_to.jkt if isinstance(bound_to, DPoPKey) else bound_to
            payload["cnf"] = {"jkt": jkt}
        _merge(payload, claims)
        protected = _merge({"typ": "at+jwt", "alg": self.alg, "kid": self.kid}, header)
        return sign_compact(protected, payload, self.key, protected.get("alg", self.alg))

    def opaque_token(
        self,
        *,
        bound_to: DPoPKey | str | None = None,
        lifetime: float = 300,
        claims: Mapping[str, Any] | None = None,
    ) -> str:
        """An opaque access token (random, not a JWT) that this issuer's introspection endpoint
        (:meth:`serve`) knows: its answer (RFC 7662 section 2.2) has ``active``, ``iss``, ``aud``,
        ``sub``, ``client_id``, ``scope``, ``exp``, ``iat``, ``token_type`` (``DPoP`` when bound)
        and ``cnf.jkt`` (RFC 9449 section 6.2). ``claims`` overrides or adds answer members
        (``REMOVE`` leaves one out). The issuer is read when the answer is made, so a token
        made before ``serve()`` names the server's URL."""
        now = int(self.clock())
        answer: dict[str, Any] = {
            "aud": self.audience,
            "sub": "user-123",
            "client_id": "client-abc",
            "scope": "read",
            "iat": now,
            "exp": now + int(lifetime),
            "token_type": "Bearer",
        }
        if bound_to is not None:
            jkt = bound_to.jkt if isinstance(bound_to, DPoPKey) else bound_to
            answer["cnf"] = {"jkt": jkt}
            answer["token_type"] = "DPoP"  # noqa: S105 - not a secret
        _merge(answer, claims)
        token = "op_" + secrets.token_urlsafe(24)
        self.opaque[token] = answer
        return token

    def introspect(self, token: str) -> dict[str, Any]:
        """The RFC 7662 answer for ``token``: ``{"active": false}`` for an unknown, revoked or
        expired token (by this issuer's clock)."""
        answer = self.opaque.get(token)
        if answer is None or token in self.revoked:
            return {"active": False}
        exp = answer.get("exp")
        if isinstance(exp, int | float) and exp <= self.clock():
            return {"active": False}
        return {"active": True, "iss": self.issuer, **answer}

    def serve(
        self, *, clients: Mapping[str, str | None] | None = None, **options: Any
    ) -> AuthorizationServer:
        """A real authorization server for this issuer on a free loopback port, run in a thread
        for the length of a ``with`` block (see :class:`AuthorizationServer` for ``options``).
        ``clients`` maps client ids to secrets (None: a public client); by default one client,
        ``client-abc`` with secret ``secret-abc``."""
        return AuthorizationServer(
            self, clients={"client-abc": "secret-abc"} if clients is None else clients, **options
        )


class AuthorizationServer:
    """A small real OAuth 2.0 authorization server on loopback, for tests: a thread, stdlib only.

    Made by :meth:`TokenIssuer.serve`; while the ``with`` block runs, the issuer's ``issuer`` is
    this server's URL (``http://127.0.0.1:PORT`` plus ``path``), so its tokens and ``settings()``
    name it. It serves:

    * the metadata document (RFC 8414) at ``/.well-known/oauth-authorization-server{path}`` and
      the OpenID one at ``{path}/.well-known/openid-configuration`` (``well_known`` picks which);
      ``metadata`` adds or replaces members (``REMOVE`` leaves one out) for negative tests;
    * the JWK Set at ``{path}/jwks``;
    * the introspection endpoint ``{path}/introspect`` (RFC 7662): the issuer's opaque tokens
      (:meth:`TokenIssuer.opaque_token`), client authentication ``client_secret_basic`` or
      ``client_secret_post``; ``introspection_requests`` counts the calls, ``introspection_delay``
      slows each answer, ``introspection_reply`` replaces every answer with
      ``(status, content_type, body)`` for negative tests;
    * the token endpoint ``{path}/token``: client credentials and refresh token grants, client
      authentication ``client_secret_basic`` / ``client_secret_post`` (``none`` for public
      clients, whose secret in ``clients`` is None). Every request needs a DPoP proof, checked
      with the middleware's own proof checks (RFC 9449 section 5: ``htm`` POST, ``htu`` the token
      endpoint, fresh ``iat``, unused ``jti``); with ``require_nonce`` it must carry the server's
      current nonce, else ``400 use_dpop_nonce`` with a ``DPoP-Nonce`` header (section 8). Tokens
      are bound to the proof's key (``cnf.jkt``). Refresh tokens of confidential clients are bound
      to the client, those of public clients to the DPoP key too (section 5), and rotate.

    ``token_requests`` records each token request (grant, client authentication, proof claims)
    for assertions; ``rotate_nonce()`` makes a new nonce.
    """

    def __init__(
        self,
        issuer: TokenIssuer,
        *,
        clients: Mapping[str, str | None],
        require_nonce: bool = False,
        path: str = "",
        well_known: tuple[str, ...] = ("oauth-authorization-server", "openid-configuration"),
        metadata: Mapping[str, Any] | None = None,
        auth_methods: tuple[str, ...] = ("client_secret_basic", "client_secret_post", "none"),
        lifetime: float = 300,
        token_type: str = "DPoP",  # noqa: S107 - a token type, not a secret
        issue_refresh_tokens: bool = True,
        opaque_tokens: bool = False,
        host: str = "127.0.0.1",
    ) -> None:
        from dpop_middleware.core.proof import ProofParser
        from dpop_middleware.settings import DEFAULT_ALGORITHMS

        self.issuer_kit = issuer
        self.clients = dict(clients)
        self.require_nonce = require_nonce
        self.path = "/" + path.strip("/") if path.strip("/") else ""
        self.well_known = well_known
        self.extra_metadata = dict(metadata or {})
        self.auth_methods = auth_methods
        self.lifetime = lifetime
        self.token_type = token_type
        self.issue_refresh_tokens = issue_refresh_tokens
        #: The token endpoint issues opaque tokens (checked by introspection) instead of JWTs.
        self.opaque_tokens = opaque_tokens
        #: One entry per introspection request: (client_id, auth_method, token_type_hint).
        self.introspection_requests: list[tuple[str | None, str | None, str | None]] = []
        self.introspection_delay = 0.0
        self.introspection_reply: tuple[int, str, bytes] | None = None
        self.algorithms = DEFAULT_ALGORITHMS
        self.nonce: str = secrets.token_urlsafe(16)
        self.token_requests: list[dict[str, Any]] = []
        self._proofs = ProofParser(self.algorithms, max_jti_length=128, cache_size=64)
        self._jtis: set[tuple[str, str]] = set()
        self._refresh: dict[str, tuple[str, str | None, str]] = {}  # token -> client, jkt, scope
        self._lock = threading.Lock()
        self._saved_issuer = issuer.issuer
        self._httpd = _http_server(self, host)
        port = self._httpd.server_address[1]
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.origin = f"http://{netloc}"
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The issuer identifier (what ``iss`` and the metadata's ``issuer`` say)."""
        return self.origin + self.path

    @property
    def token_endpoint(self) -> str:
        return self.url + "/token"

    @property
    def jwks_uri(self) -> str:
        return self.url + "/jwks"

    @property
    def introspection_endpoint(self) -> str:
        return self.url + "/introspect"

    def introspection_settings(self, **extra: Any) -> dict[str, Any]:
        """Middleware settings that read this server's metadata and introspect its opaque
        tokens as ``client-abc`` (the default client)."""
        return {
            "issuer": self.url,
            "audience": self.issuer_kit.audience,
            "introspection": {"client_id": "client-abc", "client_secret": "secret-abc"},
            **extra,
        }

    def settings(self, **extra: Any) -> dict[str, Any]:
        """Middleware settings that trust this server through its ``jwks_uri``."""
        return {
            "issuer": self.url,
            "audience": self.issuer_kit.audience,
            "jwks_uri": self.jwks_uri,
            **extra,
        }

    def rotate_nonce(self) -> str:
        self.nonce = secrets.token_urlsafe(16)
        return self.nonce

    def issue_refresh_token(
        self, client_id: str, *, bound_to: DPoPKey | None = None, scope: str = "read"
    ) -> str:
        """A refresh token for ``client_id`` as if from an earlier grant (a public client's is
        bound to ``bound_to``, RFC 9449 section 5)."""
        refresh = secrets.token_urlsafe(24)
        with self._lock:
            self._refresh[refresh] = (client_id, bound_to.jkt if bound_to else None, scope)
        return refresh

    def metadata_document(self) -> dict[str, Any]:
        document = {
            "issuer": self.url,
            "token_endpoint": self.token_endpoint,
            "jwks_uri": self.jwks_uri,
            "introspection_endpoint": self.introspection_endpoint,
            "grant_types_supported": ["client_credentials", "refresh_token"],
            "token_endpoint_auth_methods_supported": list(self.auth_methods),
            "dpop_signing_alg_values_supported": list(self.algorithms),
        }
        return _merge(document, self.extra_metadata)

    def __enter__(self) -> AuthorizationServer:
        self.issuer_kit.issuer = self.url
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"authorization-server:{self.origin}",
            daemon=True,
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self.issuer_kit.issuer = self._saved_issuer

    # -- request handling (called from the server's threads) --------------------------------------

    def handle(
        self, method: str, path: str, headers: Any, body: bytes
    ) -> tuple[int, dict[str, str], Any]:
        """One request: (status, headers, JSON body)."""
        if method == "GET":
            documents = {
                f"/.well-known/oauth-authorization-server{self.path}": "oauth-authorization-server",
                f"{self.path}/.well-known/openid-configuration": "openid-configuration",
            }
            if documents.get(path) in self.well_known:
                return 200, {}, self.metadata_document()
            if path == f"{self.path}/jwks":
                return 200, {}, self.issuer_kit.jwks
            return 404, {}, {"error": "not_found"}
        if method == "POST" and path == f"{self.path}/token":
            with self._lock:
                return self._token(headers, body)
        if method == "POST" and path == f"{self.path}/introspect":
            return self._introspect(headers, body)
        return 405 if path == f"{self.path}/token" else 404, {}, {"error": "not_found"}

    def _token(self, headers: Any, body: bytes) -> tuple[int, dict[str, str], Any]:
        from urllib.parse import parse_qs

        no_store = {"Cache-Control": "no-store"}

        def error(
            status: int, code: str, extra: dict[str, str] | None = None
        ) -> tuple[int, dict[str, str], Any]:
            return status, {**no_store, **(extra or {})}, {"error": code}

        try:
            form = {k: v[0] for k, v in parse_qs(body.decode(), strict_parsing=False).items()}
        except UnicodeDecodeError:
            return error(400, "invalid_request")
        # Client authentication (RFC 6749 section 2.3: one method only).
        client_id, secret, method = _client_auth(headers.get("Authorization"), form)
        if method is None:
            return error(400, "invalid_request")
        known = self.clients.get(client_id or "", REMOVE)
        good = (
            known is not REMOVE
            and method in self.auth_methods
            and (
                (method == "none" and known is None)
                or (
                    method != "none"
                    and isinstance(known, str)
                    and secret is not None
                    and hmac.compare_digest(known.encode(), secret.encode())
                )
            )
        )
        if not good:
            basic = {"WWW-Authenticate": 'Basic realm="token"'}
            return error(401, "invalid_client", basic if method == "client_secret_basic" else None)
        # The DPoP proof (RFC 9449 section 5, checked as section 4.3 says).
        proof, problem = self._check_proof(headers.get_all("DPoP") or [])
        self.token_requests.append({
            "grant_type": form.get("grant_type"),
            "client_id": client_id,
            "auth_method": method,
            "proof": None if proof is None else dict(proof.claims),
            "refused": problem,
        })  # fmt: skip
        if problem == "use_dpop_nonce":
            return error(400, "use_dpop_nonce", {"DPoP-Nonce": self.nonce})
        if problem is not None or proof is None:
            return error(400, "invalid_dpop_proof")
        jkt = proof.key.jkt
        grant = form.get("grant_type")
        if grant == "client_credentials":
            if method == "none":
                return error(400, "unauthorized_client")
            scope = form.get("scope", "read")
        elif grant == "refresh_token":
            held = self._refresh.get(form.get("refresh_token", ""))
            if held is None or held[0] != client_id or (held[1] is not None and held[1] != jkt):
                return error(400, "invalid_grant")
            del self._refresh[form["refresh_token"]]  # rotated
            scope = held[2]
        else:
            return error(400, "unsupported_grant_type")
        made = self.issuer_kit.opaque_token if self.opaque_tokens else self.issuer_kit.token
        token = made(
            bound_to=jkt,
            lifetime=self.lifetime,
            claims={"client_id": client_id, "sub": client_id, "scope": scope},
        )
        answer: dict[str, Any] = {
            "access_token": token,
            "token_type": self.token_type,
            "expires_in": int(self.lifetime),
            "scope": scope,
        }
        if self.issue_refresh_tokens:
            refresh = secrets.token_urlsafe(24)
            self._refresh[refresh] = (str(client_id), jkt if method == "none" else None, scope)
            answer["refresh_token"] = refresh
        extra = {"DPoP-Nonce": self.nonce} if self.require_nonce else {}
        return 200, {**no_store, **extra}, answer

    def _introspect(self, headers: Any, body: bytes) -> tuple[int, dict[str, str], Any]:
        """RFC 7662 section 2: an authenticated client asks about a token."""
        from urllib.parse import parse_qs

        if self.introspection_delay:
            time.sleep(self.introspection_delay)
        try:
            form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        except UnicodeDecodeError:
            return 400, {}, {"error": "invalid_request"}
        client_id, secret, method = _client_auth(headers.get("Authorization"), form)
        self.introspection_requests.append((client_id, method, form.get("token_type_hint")))
        known = self.clients.get(client_id or "")
        if (
            method not in ("client_secret_basic", "client_secret_post")
            or not isinstance(known, str)
            or secret is None
            or not hmac.compare_digest(known.encode(), secret.encode())
        ):
            return (
                401,
                {"WWW-Authenticate": 'Basic realm="introspect"'},
                {"error": "invalid_client"},
            )
        if self.introspection_reply is not None:
            return _Raw(*self.introspection_reply)  # type: ignore[return-value]
        if "token" not in form:
            return 400, {}, {"error": "invalid_request"}
        return 200, {"Cache-Control": "no-store"}, self.issuer_kit.introspect(form["token"])

    def _check_proof(self, values: list[str]) -> tuple[Any, str | None]:
        from dpop_middleware.core.headers import proof_value
        from dpop_middleware.core.htu import check_htu, normalize_uri
        from dpop_middleware.core.proof import check_iat
        from dpop_middleware.errors import InvalidDPoPProofError

        try:
            value = proof_value(values, 8192)
            if value is None:
                return None, "proof_missing"
            proof = self._proofs.parse(value)
            if proof.htm != "POST":
                return proof, "htm_mismatch"
            check_htu(proof.htu, normalize_uri(self.token_endpoint))
            check_iat(proof, self.issuer_kit.clock(), 60, 10)
        except InvalidDPoPProofError as exc:
            return None, exc.reason
        if self.require_nonce and proof.nonce != self.nonce:
            return proof, "use_dpop_nonce"
        seen = (proof.key.jkt, proof.jti)
        if seen in self._jtis:
            return proof, "replayed"
        self._jtis.add(seen)
        return proof, None


class _Raw:
    """A reply given as is (status, content type, body), for negative tests."""

    def __init__(self, status: int, content_type: str, body: bytes) -> None:
        self.status, self.content_type, self.body = status, content_type, body


def _client_auth(
    authorization: str | None, form: dict[str, str]
) -> tuple[str | None, str | None, str | None]:
    """(client_id, secret, method) of a token request; method None when it is ambiguous."""
    import base64
    from urllib.parse import unquote_plus

    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic" or "client_secret" in form:
            return None, None, None
        try:
            pair = base64.b64decode(value.strip(), validate=True).decode()
        except ValueError:
            return None, None, None
        client_id, sep, secret = pair.partition(":")
        if not sep or ("client_id" in form and form["client_id"] != unquote_plus(client_id)):
            return None, None, None
        return unquote_plus(client_id), unquote_plus(secret), "client_secret_basic"
    if "client_secret" in form:
        return form.get("client_id"), form["client_secret"], "client_secret_post"
    return form.get("client_id"), None, "none"


def _http_server(owner: AuthorizationServer, host: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, method: str) -> None:
            size = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(min(size, 65536)) if size else b""
            path = self.path.split("?", 1)[0]
            replied = owner.handle(method, path, self.headers, body)
            if isinstance(replied, _Raw):
                status, headers = replied.status, {}
                payload, content_type = replied.body, replied.content_type
            else:
                status, headers, document = replied
                payload, content_type = json.dumps(document).encode(), "application/json"
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            # The client may have given up (a deadline test): nothing to tell it then.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(payload)

        def do_GET(self) -> None:
            self._answer("GET")

        def do_POST(self) -> None:
            self._answer("POST")

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: tests assert on responses, and a log could show a secret

    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

    return Server((host, 0), Handler)


@contextmanager
def serve(app: Any, *, host: str = "127.0.0.1", timeout: float = 5.0) -> Iterator[str]:
    """Run an ASGI ``app`` under uvicorn in a background thread; yield its base URL.

    The server listens on a free port of ``host`` (loopback by default) and is stopped, lifespan
    shutdown included, when the block ends. For tests and demos of clients that need a real
    socket (requests, curl); it needs ``uvicorn``.
    """
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    # log_config=None: leave the process's logging configuration alone.
    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn:{port}", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test server on {host}:{port} did not start")
            time.sleep(0.005)
        yield f"http://[{host}]:{port}" if family == socket.AF_INET6 else f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


__all__ = [
    "REMOVE",
    "AuthorizationServer",
    "DPoPKey",
    "TokenIssuer",
    "ath_for",
    "serve",
    "sign_compact",
]
