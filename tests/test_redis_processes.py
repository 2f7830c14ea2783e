"""Two server processes sharing one Redis: a proof accepted by one is refused by the other.

Two uvicorn servers on two loopback ports run ``tests.apps.asgi_app`` with the same settings file
(same issuer JWK Set, same ``public_url`` so both compute the same ``htu``, same Redis prefix).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import API
from redis_fixtures import free_port

from dpop_middleware.testing import DPoPKey, TokenIssuer

ROOT = Path(__file__).resolve().parent.parent


def _wait_healthy(base: str, process: subprocess.Popen[bytes], deadline: float) -> None:
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server for {base} exited with {process.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=0.5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server for {base} did not answer /health in time")
        time.sleep(0.05)


@pytest.fixture
def two_servers(
    tmp_path: Path, issuer: TokenIssuer, redis_url: str, key_prefix: str
) -> Iterator[tuple[str, str]]:
    settings = {
        "issuer": issuer.issuer,
        "audience": issuer.audience,
        "jwks": issuer.jwks,
        "public_url": API,
        "exclude_paths": ["/health"],
        "replay_store": {"url": redis_url, "key_prefix": key_prefix},
    }
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(settings))
    env = {**os.environ, "DPOP_TEST_SETTINGS": str(path)}
    ports = [free_port(), free_port()]
    processes = [
        subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn", "tests.apps.asgi_app:app",
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        for port in ports
    ]  # fmt: skip
    try:
        bases = [f"http://127.0.0.1:{port}" for port in ports]
        deadline = time.monotonic() + 20
        for base, process in zip(bases, processes, strict=True):
            _wait_healthy(base, process, deadline)
        yield bases[0], bases[1]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def test_a_proof_used_on_one_process_is_refused_by_the_other(
    two_servers: tuple[str, str], issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    first, second = two_servers
    token = issuer.token(bound_to=dpop_key)

    def headers() -> dict[str, str]:
        proof = dpop_key.proof("GET", f"{API}/items", access_token=token)
        return {"Authorization": f"DPoP {token}", "DPoP": proof}

    used = headers()
    accepted = httpx.get(f"{first}/items", headers=used)
    assert accepted.status_code == 200, accepted.text
    replayed = httpx.get(f"{second}/items", headers=used)
    assert replayed.status_code == 401
    assert replayed.json() == {
        "error": "invalid_dpop_proof",
        "error_description": "DPoP proof has already been used",
    }
    fresh = httpx.get(f"{second}/items", headers=headers())
    assert fresh.status_code == 200, fresh.text
    assert fresh.json()["pid"] != accepted.json()["pid"]
    assert httpx.get(f"{first}/items", headers=used).status_code == 401
