"""The demo doubles as a smoke test: it runs here over real HTTP and its exit code is asserted."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import httpx
import pytest

from dpop_middleware import demo
from dpop_middleware.demo import Expect, Row


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "dpop_middleware.demo", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    # The demo times itself, server start and stop included: it must be quick.
    took = re.search(r"rows as expected \((?P<seconds>[0-9.]+) s\)", result.stdout)
    if took is not None:
        assert float(took["seconds"]) < 5, result.stdout
    return result


def table_rows(stdout: str) -> dict[str, str]:
    """scenario -> result column, read off the printed table."""
    rows = {}
    for line in stdout.splitlines():
        for word in (" OK", " FAIL"):
            if word + " " in line + " ":
                rows[line.split("  ")[0]] = word.strip()
    return rows


def test_demo_passes() -> None:
    result = run_demo()
    assert result.returncode == 0, result.stdout + result.stderr
    rows = table_rows(result.stdout)
    assert rows == {
        "legitimate request: GET /items": "OK",
        "same request replayed": "OK",
        "stolen token, attacker's own key": "OK",
        "stolen token downgraded to Bearer": "OK",
        "proof for GET /items sent to GET /admin": "OK",
        "proof for GET /items sent as DELETE": "OK",
        "legitimate client again, fresh proof": "OK",
    }
    assert "401 invalid_dpop_proof" in result.stdout
    assert "DPoP proof has already been used" in result.stdout
    assert re.search(r"7 of 7 rows as expected \([0-9.]+ s\)", result.stdout)
    assert result.stderr == ""


def test_demo_with_nonces_passes() -> None:
    result = run_demo("--nonce")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = table_rows(result.stdout)
    assert list(rows)[:2] == [
        "nonce handshake: first request, no nonce",
        "nonce handshake: retry with DPoP-Nonce",
    ]
    assert set(rows.values()) == {"OK"} and len(rows) == 8
    assert "401 use_dpop_nonce + DPoP-Nonce" in result.stdout


def test_demo_against_redis_passes(redis_url: str) -> None:
    for extra in ((), ("--nonce",)):
        result = run_demo("--redis", redis_url, *extra)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"replay store {demo._shown(redis_url)}" in result.stdout


def test_demo_fails_when_redis_is_down() -> None:
    # Fail closed: the replay store cannot answer, so legitimate requests get 503, not 200.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        result = run_demo("--redis", f"redis://127.0.0.1:{port}/0")
    assert result.returncode == 1
    assert table_rows(result.stdout)["legitimate request: GET /items"] == "FAIL"
    assert "503 temporarily_unavailable" in result.stdout


def test_a_broken_expectation_exits_non_zero() -> None:
    result = run_demo("--break-expectation")
    assert result.returncode == 1
    assert table_rows(result.stdout)["same request replayed"] == "FAIL"
    assert "6 of 7 rows as expected" in result.stdout


def test_a_bad_replay_store_setting_exits_2() -> None:
    result = run_demo("--redis", "mysql://nope")
    assert result.returncode == 2
    assert "cannot start the demo API" in result.stderr and "replay_store" in result.stderr


@pytest.mark.parametrize(
    ("got", "ok"),
    [
        pytest.param(Expect(401, "invalid_token"), True, id="same"),
        pytest.param(Expect(401, "invalid_token", nonce_header=True), True, id="extra-nonce"),
        pytest.param(Expect(401, "invalid_dpop_proof"), False, id="other-error"),
        pytest.param(Expect(400, "invalid_token"), False, id="other-status"),
        pytest.param(Expect(200), False, id="accepted"),
    ],
)
def test_row_check(got: Expect, ok: bool) -> None:
    row = Row("s", Expect(401, "invalid_token"), got)
    assert row.ok is ok
    assert demo.all_ok([Row("a", Expect(200), Expect(200)), row]) is ok


def test_a_missing_nonce_header_fails_the_row() -> None:
    want = Expect(401, "use_dpop_nonce", nonce_header=True)
    assert not Row("s", want, Expect(401, "use_dpop_nonce")).ok
    assert not demo.all_ok([])


def test_row_from_reads_the_challenge() -> None:
    response = httpx.Response(
        401,
        headers={
            "WWW-Authenticate": 'DPoP error="invalid_dpop_proof", '
            'error_description="DPoP proof has already been used", algs="ES256"',
            "DPoP-Nonce": "n",
        },
    )
    row = demo.row_from("replay", Expect(401, "invalid_dpop_proof"), response)
    assert row.got == Expect(401, "invalid_dpop_proof", nonce_header=True)
    assert row.why == "DPoP proof has already been used"
    assert row.ok
    table = demo.render([row])
    assert "401 invalid_dpop_proof + DPoP-Nonce" in table and table.splitlines()[2].find("OK") > 0


def test_missing_demo_packages_name_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = demo.importlib.util.find_spec
    monkeypatch.setattr(
        demo.importlib.util, "find_spec", lambda name: None if name == "uvicorn" else real(name)
    )
    assert demo.main([]) == 2
    err = capsys.readouterr().err
    assert "uvicorn missing" in err and "pip install 'dpop-middleware[demo]'" in err


def test_secrets_in_a_redis_url_are_not_printed() -> None:
    assert demo._shown("redis://user:s3cret@cache:6379/0") == "redis://user:***@cache:6379/0"
    assert demo._shown("memory://") == "memory://"
