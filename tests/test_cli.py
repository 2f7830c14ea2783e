"""The command-line tool: each command run for real (a subprocess at least once each), ``check``
against real HTTP endpoints and a real redis-server, ``explain`` through the real engine."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from redis_fixtures import free_port

from dpop_middleware.cli import STEPS, main
from dpop_middleware.client import DPoPKey
from dpop_middleware.testing import TokenIssuer

ROOT = Path(__file__).resolve().parent.parent
URL = "https://api.example/items"


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m dpop_middleware ...`` in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "dpop_middleware", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def call(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """The same command in this process (faster): exit code and stdout."""
    code = main(list(args))
    return code, capsys.readouterr().out


def settings_file(tmp_path: Path, settings: dict[str, Any]) -> str:
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(settings))
    return str(path)


@pytest.fixture
def kit() -> TokenIssuer:
    return TokenIssuer()


@pytest.fixture
def key() -> DPoPKey:
    return DPoPKey.generate()


def test_steps_list_every_reason_code_of_the_core() -> None:
    """explain maps each refusal to its step: a reason code added to the core must be listed."""
    pattern = re.compile(r'(?:Error|_bad|_invalid)\(\s*"([a-z_]+)"')
    sources = [*(ROOT / "dpop_middleware" / "core").glob("*.py"), ROOT / "dpop_middleware/flow.py"]
    reasons = {r for path in sources for r in pattern.findall(path.read_text())}
    listed = {code for _, _, codes in STEPS for code in codes}
    assert len(reasons) > 50
    assert reasons - listed == set()


# -- keygen and proof --------------------------------------------------------------------------


def test_keygen_proof_explain_chain_as_subprocesses(tmp_path: Path, kit: TokenIssuer) -> None:
    script = Path(sys.executable).parent / "dpop-middleware"
    assert script.exists(), "the console script is installed"
    made = subprocess.run(
        [str(script), "keygen", "--alg", "ES384"], capture_output=True, text=True, check=True
    )
    jwk = json.loads(made.stdout)
    assert jwk["alg"] == "ES384" and "d" in jwk
    key = DPoPKey.from_jwk(jwk)
    (tmp_path / "key.json").write_text(made.stdout)
    token = kit.token(bound_to=key)
    proof = run("proof", "--key", str(tmp_path / "key.json"), "--method", "GET", "--url", URL,
                "--token", token)  # fmt: skip
    assert proof.returncode == 0, proof.stderr
    value = proof.stdout.strip()
    settings = settings_file(tmp_path, kit.settings())
    explained = run("explain", "--settings", settings, "--request", f"GET {URL}",
                    "--dpop", value, "--token", token)  # fmt: skip
    assert explained.returncode == 0, explained.stdout + explained.stderr
    assert "result    accepted" in explained.stdout
    assert token not in explained.stdout and value not in explained.stdout
    assert token[:12] + "..." in explained.stdout


def test_keygen_json_and_bad_alg(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = call(capsys, "keygen", "--json")
    document = json.loads(out)
    assert code == 0 and DPoPKey.from_jwk(document["jwk"]).jkt == document["jkt"]
    assert main(["keygen", "--alg", "HS256"]) == 2
    assert "alg must be one of" in capsys.readouterr().err


def test_proof_claims_and_unreadable_key(tmp_path: Path, key: DPoPKey, capsys: Any) -> None:
    path = tmp_path / "key.json"
    path.write_text(json.dumps(key.private_jwk))
    code, out = call(capsys, "proof", "--key", str(path), "--method", "POST", "--url",
                     URL + "?q=1", "--nonce", "n-1", "--json")  # fmt: skip
    from dpop_middleware.core.jose import json_object

    claims = json_object(json.loads(out)["proof"].split(".")[1])
    assert code == 0 and (claims["htm"], claims["htu"], claims["nonce"]) == ("POST", URL, "n-1")
    assert "ath" not in claims
    path.write_text(json.dumps(key.public_jwk))  # no private part
    assert main(["proof", "--key", str(path), "--method", "GET", "--url", URL]) == 2
    err = capsys.readouterr().err
    assert "cannot load a private JWK" in err and key.public_jwk["x"] not in err


# -- explain -----------------------------------------------------------------------------------


def explain_json(capsys: Any, settings: str, *args: str) -> tuple[int, dict[str, Any]]:
    code, out = call(capsys, "explain", "--settings", settings, "--json", *args)
    return code, json.loads(out)


def results(report: dict[str, Any]) -> dict[str, str]:
    return {step["step"]: step["result"] for step in report["steps"]}


def test_explain_htu_only(tmp_path: Path, kit: TokenIssuer, capsys: Any) -> None:
    plain = settings_file(tmp_path, kit.settings())
    code, report = explain_json(capsys, plain, "--request", "GET http://api.example:80/a/./b")
    assert code == 0 and report["htu"] == "http://api.example/a/b" and "steps" not in report
    fixed = settings_file(tmp_path, kit.settings(public_url="https://public.example/v1"))
    code, report = explain_json(capsys, fixed, "--request", "GET http://10.0.0.5:8080/items")
    assert report["htu"] == "https://public.example/v1/items"
    assert report["htu_source"].startswith("from public_url")


@pytest.mark.parametrize(
    ("peer", "htu", "source"),
    [
        pytest.param("10.0.0.1", "https://public.example/items", "trusted proxy", id="trusted"),
        pytest.param("10.9.9.9", "http://internal:8000/items", "ignored", id="untrusted"),
        pytest.param(None, "http://internal:8000/items", "ignored", id="no-peer"),
    ],
)
def test_explain_htu_through_trusted_proxies(
    tmp_path: Path, kit: TokenIssuer, capsys: Any, peer: str | None, htu: str, source: str
) -> None:
    settings = settings_file(tmp_path, kit.settings(trusted_proxies=["10.0.0.0/24"]))
    extra = ["--peer", peer] if peer else []
    code, report = explain_json(
        capsys, settings, "--request", "GET http://internal:8000/items",
        "-H", "X-Forwarded-Proto: https", "-H", "X-Forwarded-Host: public.example", *extra,
    )  # fmt: skip
    assert (code, report["htu"]) == (0, htu) and source in report["htu_source"]


def test_explain_accepted_and_each_refusal_at_its_step(
    tmp_path: Path, kit: TokenIssuer, key: DPoPKey, capsys: Any
) -> None:
    settings = settings_file(tmp_path, kit.settings())
    token = kit.token(bound_to=key)
    good = key.proof("GET", URL, access_token=token)
    code, report = explain_json(capsys, settings, "--request", f"GET {URL}", "--dpop", good,
                                "--token", token)  # fmt: skip
    assert (code, report["outcome"]) == (0, "accepted")
    assert set(results(report).values()) == {"pass"}
    assert report["proof"]["has_ath"] is True and report["token"]["cnf_jkt"] == key.jkt

    cases = [
        (key.proof("POST", URL, access_token=token), token, "htm", "htm_mismatch"),
        (key.proof("GET", URL + "x", access_token=token), token, "htu", "htu_mismatch"),
        (key.proof("GET", URL), token, "ath", "ath_missing"),
        (key.proof("GET", URL, access_token=token, iat=0), token, "freshness", "iat_too_old"),
    ]
    expired = kit.token(bound_to=key, lifetime=-60)
    cases.append((key.proof("GET", URL, access_token=expired), expired, "token", "token_expired"))
    unbound = kit.token()
    cases.append(
        (key.proof("GET", URL, access_token=unbound), unbound, "binding", "token_not_bound")
    )
    for proof, sent, step, reason in cases:
        code, report = explain_json(capsys, settings, "--request", f"GET {URL}", "--dpop", proof,
                                    "--token", sent)  # fmt: skip
        assert (code, report["reason"]) == (1, reason), report
        steps = results(report)
        assert steps[step] == "FAIL"
        names = [name for name, _, _ in STEPS]
        assert all(steps[n] == "pass" for n in names[: names.index(step)])
        assert all(steps[n] == "-" for n in names[names.index(step) + 1 :])


def test_explain_text_output_for_a_missing_proof(
    tmp_path: Path, kit: TokenIssuer, key: DPoPKey, capsys: Any
) -> None:
    settings = settings_file(tmp_path, kit.settings())
    token = kit.token(bound_to=key)
    code, out = call(capsys, "explain", "--settings", settings, "--request", f"GET {URL}",
                     "--token", token)  # fmt: skip
    assert code == 1
    assert "  FAIL  dpop_header  proof_missing: DPoP proof is missing" in out
    assert "result    refused: 401 invalid_dpop_proof (reason proof_missing)" in out
    assert token not in out


def test_explain_with_jwks_uri_from_a_real_server(
    tmp_path: Path, kit: TokenIssuer, key: DPoPKey, capsys: Any
) -> None:
    with kit.serve() as server:
        settings = settings_file(tmp_path, server.settings())
        token = kit.token(bound_to=key)
        proof = key.proof("GET", URL, access_token=token)
        code, report = explain_json(capsys, settings, "--request", f"GET {URL}", "--dpop", proof,
                                    "--token", token)  # fmt: skip
    assert (code, report["outcome"]) == (0, "accepted")


def test_explain_excluded_path_and_usage_errors(
    tmp_path: Path, kit: TokenIssuer, capsys: Any
) -> None:
    settings = settings_file(tmp_path, kit.settings(exclude_paths=["/health"]))
    code, report = explain_json(capsys, settings, "--request", "GET https://api.example/health",
                                "--token", "abc")  # fmt: skip
    assert code == 0 and report["outcome"].startswith("not protected")
    assert main(["explain", "--settings", settings, "--request", "nonsense"]) == 2
    assert main(["explain", "--settings", settings, "--request", f"GET {URL}", "--peer", "x"]) == 2
    assert main(["explain", "--settings", str(tmp_path / "missing.json"), "--request", "x"]) == 2
    assert main(["explain"]) == 2


# -- check -------------------------------------------------------------------------------------


def test_check_with_a_real_jwks_uri(tmp_path: Path, kit: TokenIssuer) -> None:
    with kit.serve() as server:
        settings = settings_file(tmp_path, server.settings())
        done = run("check", "--settings", settings)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"ok    jwks          1 usable key(s) from {server.jwks_uri} (kid test-key-1)" in (
        done.stdout
    )
    assert "ok    replay_store  memory://" in done.stdout


def test_check_with_discovery(tmp_path: Path, kit: TokenIssuer, capsys: Any) -> None:
    with kit.serve(path="/tenant") as server:
        good = settings_file(tmp_path, {"issuer": server.url, "audience": "a"})
        code, out = call(capsys, "check", "--settings", good)
        assert code == 0, out
        assert f"1 usable key(s) from {server.jwks_uri}" in out
    wrong = settings_file(tmp_path, {"issuer": server.url + "/other", "audience": "a"})
    code, out = call(capsys, "check", "--settings", wrong)
    assert code == 1 and "FAIL  metadata" in out


def test_check_unreachable_jwks_uri(tmp_path: Path, capsys: Any) -> None:
    uri = f"http://127.0.0.1:{free_port()}/jwks"
    settings = settings_file(
        tmp_path, {"issuer": "https://as.example", "audience": "a", "jwks_uri": uri}
    )
    code, out = call(capsys, "check", "--settings", settings, "--json")
    document = json.loads(out)
    jwks = next(item for item in document["checks"] if item["check"] == "jwks")
    assert code == 1 and document["ok"] is False and jwks["ok"] is False
    assert uri in jwks["detail"] and "reachable" in jwks["fix"]


def test_check_bad_settings_names_the_key(tmp_path: Path, kit: TokenIssuer, capsys: Any) -> None:
    settings = settings_file(tmp_path, {**kit.settings(), "audiense": "x"})
    code, out = call(capsys, "check", "--settings", settings)
    assert code == 1 and out.startswith("FAIL  settings") and "did you mean 'audience'" in out


def test_check_pings_a_real_redis(
    tmp_path: Path, kit: TokenIssuer, redis_url: str, capsys: Any
) -> None:
    settings = settings_file(tmp_path, kit.settings(replay_store=redis_url))
    code, out = call(capsys, "check", "--settings", settings)
    assert code == 0 and "ok    replay_store  redis://" in out and "answered a write" in out
    dead = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    settings = settings_file(tmp_path, kit.settings(replay_store=dead))
    code, out = call(capsys, "check", "--settings", settings)
    assert code == 1 and "FAIL  replay_store" in out and "503 replay_store_unavailable" in out
    assert "hunter2" not in out


def test_check_settings_from_a_python_module(tmp_path: Path, kit: TokenIssuer) -> None:
    (tmp_path / "mysettings.py").write_text(f"DPOP = {kit.settings()!r}\n")
    done = run("check", "--settings", "mysettings:DPOP", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"] is True
    missing = run("check", "--settings", "mysettings:NOPE", cwd=tmp_path)
    assert missing.returncode == 2 and "cannot load settings" in missing.stderr
