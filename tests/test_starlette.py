"""A bad setting stops start-up under Starlette and FastAPI, where the middleware is built lazily.

Starlette builds ``add_middleware`` / ``middleware=[...]`` on the first ASGI call (the lifespan
startup under uvicorn); a ``ConfigurationError`` raised there made uvicorn (``--lifespan auto``)
start anyway and answer every request with a 500 and a traceback. Now the lifespan startup fails
with the error's message and uvicorn exits non-zero without serving a request; with
``--lifespan off`` every request gets a 500 JSON refusal that names no setting.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from redis_fixtures import free_port
from starlette.applications import Starlette
from starlette.middleware import Middleware
from test_frameworks_support import ROOT, starlette_test_client
from test_servers import BIN, send

from dpop_middleware import ConfigurationError, DPoPMiddleware, DPoPWSGIMiddleware, ReplayStoreError
from tests.apps.bad_settings import BAD, BAD_KEY

APPS = [
    pytest.param("tests.apps.bad_settings:fastapi_app", id="fastapi-add_middleware"),
    pytest.param("tests.apps.bad_settings:starlette_app", id="starlette-middleware-list"),
]
TestClient = starlette_test_client()
EXIT_WITHIN = 10.0
BODY = {
    "error": "server_error",
    "error_description": "The DPoP middleware is misconfigured; see the server log",
}


@contextmanager
def uvicorn(target: str, *extra: str, log: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """uvicorn on a socket this test bound and listens on, so a connection made before the
    server is up waits in the backlog; stopped (if still running) on the way out."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port: int = sock.getsockname()[1]
    os.set_inheritable(sock.fileno(), True)
    command = [str(BIN / "uvicorn"), target, "--fd", str(sock.fileno()), *extra]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=ROOT, pass_fds=(sock.fileno(),), stdout=out, stderr=subprocess.STDOUT
        )
    sock.close()
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


@pytest.mark.parametrize("target", APPS)
def test_a_bad_setting_stops_uvicorn_before_it_serves_a_request(
    target: str, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    with uvicorn(target, log=log) as (proc, port):
        # Queued in the backlog before the server runs: answered only if it ever serves.
        waiting = socket.create_connection(("127.0.0.1", port), timeout=EXIT_WITHIN + 5)
        waiting.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        started = time.monotonic()
        try:
            code = proc.wait(EXIT_WITHIN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"uvicorn still running after {EXIT_WITHIN} s:\n{log.read_text()}")
        assert time.monotonic() - started < EXIT_WITHIN
        try:
            answer = waiting.recv(65536)
        except ConnectionResetError:
            answer = b""
        waiting.close()
    output = log.read_text()
    assert code == 3, output  # uvicorn's STARTUP_FAILURE
    assert answer == b"", answer
    assert f"unknown setting {BAD_KEY!r} (did you mean 'replay_store'?)" in output
    assert "Application startup failed. Exiting." in output
    assert "lifespan' protocol appears unsupported" not in output
    assert "Traceback" not in output
    assert "Uvicorn running on" not in output


def test_with_lifespan_off_every_request_gets_a_500_that_names_no_setting(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with uvicorn(APPS[0].values[0], "--lifespan", "off", log=log) as (proc, port):
        deadline = time.monotonic() + 20
        while True:
            try:
                status, headers, body = send(port, "GET", "/health", [], timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        assert (status, json.loads(body)) == (500, BODY)
        assert ("content-type", "application/json") in headers
        assert ("cache-control", "no-store") in headers
        status, _, body = send(port, "HEAD", "/health", [])
        assert (status, body) == (500, b"")
        status, _, body = send(port, "GET", "/me", [])
        assert (status, json.loads(body)) == (500, BODY)
        assert proc.poll() is None
    output = log.read_text()
    assert output.count("dpop startup_failed: ") == 1, output
    assert f"unknown setting {BAD_KEY!r}" in output
    assert "Traceback" not in output


# -- in process ---------------------------------------------------------------------------------


async def ok_app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
    pass


def test_direct_construction_raises_at_once_even_inside_a_coroutine() -> None:
    with pytest.raises(ConfigurationError, match=BAD_KEY):
        DPoPMiddleware(ok_app, BAD)
    with pytest.raises(ConfigurationError, match=BAD_KEY):
        DPoPWSGIMiddleware(lambda environ, start: [], BAD)

    async def build() -> None:
        DPoPMiddleware(ok_app, BAD)

    with pytest.raises(ConfigurationError, match=BAD_KEY):
        asyncio.run(build())


def test_building_the_starlette_stack_outside_an_asgi_call_raises() -> None:
    app = Starlette(middleware=[Middleware(DPoPMiddleware, settings=BAD)])
    with pytest.raises(ConfigurationError, match=BAD_KEY):
        app.build_middleware_stack()


def test_the_test_client_lifespan_raises_the_configuration_error() -> None:
    app = Starlette(middleware=[Middleware(DPoPMiddleware, settings=BAD)])
    with pytest.raises(ConfigurationError, match=BAD_KEY), TestClient(app):
        pass  # pragma: no cover


def test_a_redis_that_does_not_answer_ping_on_startup_stops_start_up_too() -> None:
    store = {"url": f"redis://127.0.0.1:{free_port()}/0", "ping_on_startup": True, "timeout": 0.2}
    settings = {**BAD, "replay_store": store}
    del settings[BAD_KEY]
    app = Starlette(middleware=[Middleware(DPoPMiddleware, settings=settings)])
    with pytest.raises(ReplayStoreError, match="failed at start-up"), TestClient(app):
        pass  # pragma: no cover
