"""The core imports no web framework and does no network I/O of its own."""

from __future__ import annotations

import ast
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import API
from core_helpers import Harness

from dpop_middleware.testing import DPoPKey, TokenIssuer

CORE = Path(__file__).parent.parent / "dpop_middleware" / "core"
FORBIDDEN = {
    "asyncio", "socket", "ssl", "http", "urllib.request", "threading", "select", "selectors",
    "starlette", "fastapi", "werkzeug", "flask", "django", "redis", "httpx", "requests", "uvicorn",
}  # fmt: skip


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_module_imports_nothing_forbidden(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            assert not any(name == f or name.startswith(f + ".") for f in FORBIDDEN), (
                path.name,
                name,
            )


def test_importing_the_package_pulls_in_no_framework() -> None:
    code = (
        "import sys, dpop_middleware, dpop_middleware.core.verifier, dpop_middleware.settings\n"
        "bad = [m for m in ('starlette', 'fastapi', 'werkzeug', 'flask', 'django', 'redis', 'httpx',"
        " 'httpx2', 'mcp', 'prometheus_client', 'opentelemetry')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_observers_import_their_integration_only_when_turned_on() -> None:
    code = (
        "import sys, dpop_middleware.observe, dpop_middleware.flow\n"
        "from dpop_middleware.testing import TokenIssuer\n"
        "from dpop_middleware.settings import Settings\n"
        "Settings.from_dict(TokenIssuer().settings(metrics=False, tracing=False))\n"
        "bad = [m for m in ('prometheus_client', 'opentelemetry') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_mcp_helpers_do_not_import_the_mcp_sdk() -> None:
    code = "import sys, dpop_middleware.mcp\nassert 'mcp' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_verification_opens_no_socket(
    monkeypatch: pytest.MonkeyPatch, make_settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    h = Harness(make_settings())
    token = issuer.token(bound_to=dpop_key)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the core tried to open a socket")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert h.dpop(dpop_key, token, "GET", API + "/items").status == 200
    assert h.dpop(dpop_key, token, "GET", API + "/items", claims={"htm": "POST"}).status == 401
