"""Each example under a real server process on loopback: uvicorn for the ASGI adapter, gunicorn for
the WSGI one. Requests go over a real socket with http.client, so two ``DPoP`` header lines really
are two lines on the wire (uvicorn passes both; gunicorn joins them with a comma).

Every server listens on a socket this test binds to 127.0.0.1 port 0 and hands over by file
descriptor (no port race), and is stopped by the test module that started it.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gunicorn.config
import pytest
from test_frameworks_support import ROOT

from dpop_middleware.testing import DPoPKey
from examples import client as example_client
from examples import local_issuer

BIN = Path(sys.executable).parent
STARTUP_TIMEOUT = 20.0


@dataclass(frozen=True)
class Server:
    port: int
    prefix: str = ""

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}{path}"


def command(kind: str, target: str, fd: int, *extra: str) -> list[str]:
    if kind == "uvicorn":
        return [str(BIN / "uvicorn"), target, "--fd", str(fd), "--log-level", "warning", *extra]
    if hasattr(gunicorn.config, "ControlSocketDisable"):  # gunicorn >= 25.1
        extra = ("--no-control-socket", *extra)  # no shared socket in $HOME between servers
    return [
        str(BIN / "gunicorn"),
        target,
        "--bind",
        f"fd://{fd}",
        "--workers",
        "1",
        "--log-level",
        "warning",
        *extra,
    ]


@contextmanager
def running(kind: str, target: str, *extra: str, log: Path) -> Iterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port: int = sock.getsockname()[1]
    fd = sock.fileno()
    os.set_inheritable(fd, True)
    env = dict(os.environ, DPOP_EXAMPLE_ISSUER_KEY=str(local_issuer.KEY_FILE))
    env.pop("DJANGO_SETTINGS_MODULE", None)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command(kind, target, fd, *extra),
            cwd=ROOT,
            env=env,
            pass_fds=(fd,),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    sock.close()
    try:
        wait_ready(port, proc, log)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait()


def wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """The socket accepts at once (it was listening before the server started); wait until the
    server answers."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            status, _, _ = send(port, "GET", "/health", [], timeout=2)
        except OSError:
            time.sleep(0.05)
            continue
        if status == 200:
            return
    pytest.fail(f"server did not answer in {STARTUP_TIMEOUT}s:\n{log.read_text()}")


def send(
    port: int, method: str, target: str, headers: list[tuple[str, str]], *, timeout: float = 5
) -> tuple[int, list[tuple[str, str]], bytes]:
    """One request with exactly these header lines, repeated names included."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, target)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return (
            response.status,
            [(k.lower(), v) for k, v in response.getheaders()],
            response.read(),
        )
    finally:
        conn.close()


SERVERS = [
    pytest.param(("uvicorn", "examples.starlette_app:app"), id="uvicorn-starlette"),
    pytest.param(("uvicorn", "examples.fastapi_app:app"), id="uvicorn-fastapi"),
    pytest.param(("uvicorn", "examples.django_project.asgi:application"), id="uvicorn-django"),
    pytest.param(("gunicorn", "examples.flask_app:app"), id="gunicorn-flask"),
    pytest.param(("gunicorn", "examples.django_project.wsgi:application"), id="gunicorn-django"),
]


@pytest.fixture(scope="module", params=SERVERS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Server]]:
    kind, target = request.param
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running(kind, target, log=log) as port:
        yield kind, Server(port)


def headers_for(key: DPoPKey, url: str, **proof: Any) -> list[tuple[str, str]]:
    token = local_issuer.issuer.token(bound_to=key)
    return [
        ("Authorization", f"DPoP {token}"),
        ("DPoP", key.proof("GET", url, access_token=token, **proof)),
    ]


def test_valid_request_passes(server: tuple[str, Server]) -> None:
    _, srv = server
    key = DPoPKey.generate()
    status, headers, body = example_client.call(srv.url("/me"), key=key)
    assert status == 200, body
    assert json.loads(body) == {
        "sub": "user-123",
        "scheme": "DPoP",
        "jkt": key.jkt,
        "scope": "read",
    }
    assert "www-authenticate" not in headers


def test_two_dpop_header_lines_are_refused(server: tuple[str, Server]) -> None:
    _, srv = server
    key = DPoPKey.generate()
    good = headers_for(key, srv.url("/me"))
    second = key.proof("GET", srv.url("/me"), access_token=good[0][1].split(" ", 1)[1])
    status, headers, body = send(srv.port, "GET", "/me", [*good, ("DPoP", second)])
    assert status == 401
    assert json.loads(body) == {
        "error": "invalid_dpop_proof",
        "error_description": "More than one DPoP header",
    }
    www = [v for k, v in headers if k == "www-authenticate"]
    assert len(www) == 1 and www[0].startswith('DPoP error="invalid_dpop_proof", ')
    assert ("cache-control", "no-store") in headers
    # Each proof alone would have passed: neither was used up by the refused request.
    assert send(srv.port, "GET", "/me", good)[0] == 200


def test_no_credentials_and_the_excluded_path(server: tuple[str, Server]) -> None:
    _, srv = server
    status, headers, body = send(srv.port, "GET", "/me", [])
    assert status == 401
    assert json.loads(body)["error"] == "unauthorized"
    assert (
        "www-authenticate",
        'DPoP algs="ES256 ES384 ES512 PS256 PS384 PS512 RS256 EdDSA Ed25519"',
    ) in headers
    assert ("access-control-expose-headers", "WWW-Authenticate, DPoP-Nonce") in headers
    status, _, body = send(srv.port, "GET", "/health", [])
    assert (status, json.loads(body)) == (200, {"ok": True})


def test_head_refusal_has_headers_and_no_body(server: tuple[str, Server]) -> None:
    _, srv = server
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(b"HEAD /me HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"401"
    assert b"www-authenticate: dpop algs=" in head.lower()
    assert body == b""


def test_replayed_proof_is_refused(server: tuple[str, Server]) -> None:
    _, srv = server
    headers = headers_for(DPoPKey.generate(), srv.url("/me"))
    assert send(srv.port, "GET", "/me", headers)[0] == 200
    status, _, body = send(srv.port, "GET", "/me", headers)
    assert status == 401
    assert json.loads(body)["error_description"] == "DPoP proof has already been used"


def test_forwarded_host_from_loopback_is_not_trusted_by_default(server: tuple[str, Server]) -> None:
    _, srv = server
    forwarded = [("X-Forwarded-Host", "api.example")]
    status, _, body = send(
        srv.port,
        "GET",
        "/me",
        [*forwarded, *headers_for(DPoPKey.generate(), "http://api.example/me")],
    )
    assert status == 401
    assert json.loads(body)["error"] == "invalid_dpop_proof"


def test_http10_request_without_host_uses_the_servers_own_address(
    server: tuple[str, Server],
) -> None:
    """No Host header at all (HTTP/1.0 over a raw socket): htu is the address the server listens
    on."""
    _, srv = server
    lines = [f"{k}: {v}" for k, v in headers_for(DPoPKey.generate(), srv.url("/me"))]
    request = "\r\n".join(["GET /me HTTP/1.0", *lines, "", ""]).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"200", head + body
    assert json.loads(body)["sub"] == "user-123"


def test_the_servers_own_proxy_handling_runs_first(server: tuple[str, Server]) -> None:
    """uvicorn (--proxy-headers) and gunicorn (secure_scheme_headers) both believe
    X-Forwarded-Proto from 127.0.0.1 by default and change the scheme the middleware sees,
    whatever ``trusted_proxies`` says (the README tells how to turn that off)."""
    _, srv = server
    key = DPoPKey.generate()
    https = f"https://127.0.0.1:{srv.port}/me"
    status, _, body = send(
        srv.port, "GET", "/me", [("X-Forwarded-Proto", "https"), *headers_for(key, https)]
    )
    assert status == 200, body


# -- mount prefixes on real servers -------------------------------------------------------------


def test_uvicorn_root_path_is_part_of_htu(tmp_path: Path) -> None:
    with running(
        "uvicorn", "examples.starlette_app:app", "--root-path", "/api", log=tmp_path / "log"
    ) as port:
        srv = Server(port, prefix="/api")
        key = DPoPKey.generate()
        # The proxy in front strips /api; the client signed the public URL with it.
        status, _, body = send(port, "GET", "/me", headers_for(key, srv.url("/me")))
        assert status == 200, body
        assert json.loads(body)["jkt"] == key.jkt
        status, _, body = send(port, "GET", "/me", headers_for(key, f"http://127.0.0.1:{port}/me"))
        assert status == 401
        assert json.loads(body)["error"] == "invalid_dpop_proof"


@pytest.mark.parametrize("trusted", [True, False], ids=["proxy-trusted", "proxy-not-trusted"])
def test_gunicorn_script_name_is_part_of_htu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trusted: bool
) -> None:
    """gunicorn takes SCRIPT_NAME from a header sent by a peer in its forwarded_allow_ips
    (loopback by default), as a proxy that mounts the app under /api would send it. The
    middleware believes it only from a ``trusted_proxies`` peer: otherwise a client could move
    the split between prefix and path (tests/test_path_attacks.py)."""
    settings = local_issuer.issuer.settings(exclude_paths=["/health"])
    if trusted:
        settings["trusted_proxies"] = ["127.0.0.1"]
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    monkeypatch.setenv("DPOP_TEST_SETTINGS", str(tmp_path / "settings.json"))
    with running("gunicorn", "tests.apps.wsgi_app:app", log=tmp_path / "log") as port:
        key = DPoPKey.generate()
        url = f"http://127.0.0.1:{port}/api/me"
        mount = [("SCRIPT_NAME", "/api")]
        status, _, body = send(port, "GET", "/api/me", [*mount, *headers_for(key, url)])
        if not trusted:
            assert (status, json.loads(body)["error"]) == (400, "invalid_request")
            return
        assert status == 200, body
        assert json.loads(body)["sub"] == "user-123"
        wrong = headers_for(key, f"http://127.0.0.1:{port}/me")
        status, _, body = send(port, "GET", "/api/me", [*mount, *wrong])
        assert status == 401
        assert json.loads(body)["error"] == "invalid_dpop_proof"


def raw_request(
    port: int, target: bytes, headers: list[tuple[str, str]], host: str | None = None
) -> tuple[int, bytes]:
    """One HTTP/1.1 request with this exact request target (http.client would fix it up)."""
    lines = [f"{k}: {v}" for k, v in headers]
    host = host if host is not None else f"127.0.0.1:{port}"
    head = "\r\n".join([f"Host: {host}", *lines, "Connection: close", "", ""]).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\n" + head)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    status_line, _, rest = b"".join(chunks).partition(b"\r\n")
    return int(status_line.split(b" ", 2)[1]), rest.partition(b"\r\n\r\n")[2]


def test_a_target_without_a_leading_slash_never_names_another_port(
    server: tuple[str, Server],
) -> None:
    """``GET :8443/me`` glued onto ``Host: 127.0.0.1`` would read as ``127.0.0.1:8443/me``: a
    proof signed for another port of this host must not pass here (RFC 9449 section 4.3 step 9).
    A server that passes such a target on gets 400 invalid_request from the middleware."""
    _, srv = server
    headers = headers_for(DPoPKey.generate(), "http://127.0.0.1:8443/me")
    status, body = raw_request(srv.port, b":8443/me", headers, host="127.0.0.1")
    assert status == 400, body
    if body.startswith(b"{"):
        assert json.loads(body)["error"] == "invalid_request"


def test_a_path_escape_that_is_not_utf8_is_compared_as_sent(server: tuple[str, Server]) -> None:
    """``/me%FF`` is signed as sent; uvicorn and the werkzeug dev server hand the app the path
    decoded with U+FFFD, which must not turn into ``%EF%BF%BD``. The app has no such route: 404
    from the app means the middleware let the request through."""
    _, srv = server
    key = DPoPKey.generate()
    status, body = raw_request(srv.port, b"/me%FF", headers_for(key, srv.url("/me%FF")))
    assert status == 404, body
    status, body = raw_request(srv.port, b"/me%FF", headers_for(key, srv.url("/me%EF%BF%BD")))
    assert status == 401, body


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        pytest.param(("--workers", "2"), "(wsgi.multiprocess)", id="two-workers"),
        pytest.param(("--preload",), "was forked after the store was built", id="preload"),
    ],
)
def test_memory_store_under_several_workers_warns_once(
    tmp_path: Path, extra: tuple[str, ...], why: str
) -> None:
    """The examples use the memory store: gunicorn says it runs several processes, or forks the
    workers after the store was built; each worker warns once, at its first request."""
    log = tmp_path / "server.log"
    with running("gunicorn", "examples.flask_app:app", *extra, log=log) as port:
        key = DPoPKey.generate()
        for _ in range(3):
            status, _, body = example_client.call(f"http://127.0.0.1:{port}/me", key=key)
            assert status == 200, body
    text = log.read_text()
    lines = [line for line in text.splitlines() if "dpop memory_replay_store_not_shared" in line]
    assert 1 <= len(lines) <= 2, text  # one per worker that served a request
    assert why in lines[0]
    assert "use a Redis replay_store" in lines[0]
