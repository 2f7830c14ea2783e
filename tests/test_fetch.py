"""The shared outbound fetch (total deadline, size limit, same-scheme redirects) against real
loopback HTTP servers; the slow-drip cases through the middleware are in test_jwks.py."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from dpop_middleware.fetch import FetchError, fetch, fetch_json


class Server:
    def __init__(self) -> None:
        self.status = 200
        self.body = b'{"keys": []}'
        self.location = ""
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(outer.status)
                if outer.location:
                    self.send_header("location", outer.location)
                self.send_header("content-length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/doc"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def server() -> Iterator[Server]:
    running = Server()
    yield running
    running.server.shutdown()
    running.server.server_close()


def test_fetch_json(server: Server) -> None:
    assert fetch_json(server.url, timeout=2) == {"keys": []}


@pytest.mark.parametrize(
    ("status", "body", "location", "message"),
    [
        pytest.param(500, b"{}", "", "HTTP 500", id="http-500"),
        pytest.param(200, b"[1]", "", "not a JSON object", id="array"),
        pytest.param(200, b"{", "", "not JSON (JSONDecodeError)", id="not-json"),
        pytest.param(200, b"[" * 2000, "", "not JSON (RecursionError)", id="nested"),
        pytest.param(200, b" " * 2049, "", "document larger than 2048 bytes", id="too-large"),
        pytest.param(
            302, b"", "https://127.0.0.1:1/x", "redirect to another scheme refused",
            id="redirect-to-https",
        ),
    ],
)  # fmt: skip
def test_fetch_failures_say_why(
    server: Server, status: int, body: bytes, location: str, message: str
) -> None:
    server.status, server.body, server.location = status, body, location
    with pytest.raises(FetchError, match=re.escape(message)):
        fetch_json(server.url, timeout=2, max_bytes=2048)


def test_connection_refused_is_a_fetch_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchError, match=r"^connection refused$"):
        fetch(f"http://127.0.0.1:{port}/doc", timeout=1)
