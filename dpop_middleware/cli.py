"""The ``dpop-middleware`` command (also ``python -m dpop_middleware``): tools for operators.

* ``check --settings FILE``: validate the settings, fetch the JWK Set, ping the replay store;
* ``explain --settings FILE --request "GET https://api.example/items" [-H ...] [--dpop P]
  [--token T] [--peer IP]``: the ``htu`` the middleware expects for that request and, with a
  proof or token, every check in order with its outcome. It runs the real :class:`Engine` on a
  :class:`RequestInfo` built from the arguments (a fresh in-memory replay store, so the real
  store never records the proof), so it says what the middleware would say;
* ``keygen [--alg ES256]``: a private JWK for a DPoP key; ``proof --key FILE --method --url
  [--token] [--nonce]``: a proof, for scripts and manual tests.

Plain text for people, ``--json`` for scripts. Exit codes: 0 all good, 1 a problem found (bad
settings, an unreachable JWK Set or store, a refused request), 2 a usage error (bad arguments, a
file that cannot be read). A token, proof or key given to ``explain`` is never printed back
beyond a short prefix; secrets in settings are never printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import ipaddress
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from dpop_middleware.errors import ConfigurationError, DPoPError, ReplayStoreError
from dpop_middleware.settings import Settings

OK, PROBLEM, USAGE = 0, 1, 2
_PREFIX = 12

#: The verifier's steps in the order it runs them (core/verifier.py), with the reason codes each
#: can refuse with. tests/test_cli.py checks that every reason code in the core is listed here.
STEPS: tuple[tuple[str, str, frozenset[str]], ...] = (
    ("path", "the path is judged as the application routes it",
     frozenset({"dot_segment_path", "double_slash_path", "path_too_long"})),
    ("credentials", "one access token, in the Authorization header, with a known scheme",
     frozenset({"no_credentials", "unsupported_scheme", "malformed_authorization",
                "multiple_auth_methods", "token_in_query", "token_too_large",
                "bearer_not_allowed"})),
    ("dpop_header", "exactly one DPoP header of acceptable size (RFC 9449 4.3 step 1)",
     frozenset({"proof_missing", "multiple_proofs", "proof_too_large"})),
    ("proof", "a well-formed proof JWT: typ, alg, jwk, signature, claims (steps 2-7)",
     frozenset({"proof_malformed", "typ_invalid", "alg_not_allowed", "crit_unsupported",
                "jwk_missing", "jwk_private", "jwk_invalid", "signature_invalid",
                "jti_missing", "jti_too_long", "htm_missing", "htu_missing", "iat_missing",
                "ath_invalid", "nonce_invalid_type"})),
    ("htm", "htm is the request method (step 8)", frozenset({"htm_mismatch"})),
    ("htu", "htu is the request URI (step 9)",
     frozenset({"htu_invalid", "htu_mismatch", "invalid_host", "invalid_path",
                "untrusted_mount_prefix"})),
    ("ath", "ath is the hash of the access token (step 12, section 7)",
     frozenset({"ath_missing", "ath_mismatch"})),
    ("freshness", "iat within the window, or a valid server nonce (steps 10-11)",
     frozenset({"iat_too_old", "iat_in_future", "nonce_invalid", "nonce_missing"})),
    ("token", "the access token: signature, typ, iss, aud, exp (RFC 9068)",
     frozenset({"token_malformed", "token_alg_not_allowed", "token_typ_invalid", "kid_missing",
                "unknown_kid", "token_signature_invalid", "issuer_mismatch",
                "audience_mismatch", "token_exp_missing", "token_expired",
                "token_not_yet_valid", "token_inactive", "token_type_mismatch",
                "jwks_unavailable", "downgrade", "token_verifier_error",
                "metadata_unavailable", "introspection_unavailable"})),
    ("binding", "the token's cnf.jkt is the proof key (section 6)",
     frozenset({"token_not_bound", "token_binding_unsupported", "jkt_mismatch"})),
    ("authorization", "the token's scopes and claims cover the route (required_scopes, helpers)",
     frozenset({"insufficient_scope", "claim_mismatch", "not_verified"})),
    ("replay", "the proof's jti was not used before (section 11.1)",
     frozenset({"replayed", "replay_store_unavailable"})),
)  # fmt: skip


class UsageError(Exception):
    """Bad arguments or an unreadable file: exit code 2."""


# -- loading ---------------------------------------------------------------------------------


def load_settings_source(source: str) -> Mapping[str, Any]:
    """A settings dict from a JSON file, or from ``module:NAME`` (a dict in a Python module)."""
    path = Path(source)
    if path.is_file():
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read settings from {source}: {exc}") from None
    elif ":" in source and not source.endswith(".json"):
        module_name, _, name = source.partition(":")
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # as python -m does, so "myapp.settings:DPOP" works
        try:
            value = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as exc:
            raise UsageError(f"cannot load settings {source}: {exc}") from None
    else:
        raise UsageError(f"settings file not found: {source} (a JSON file, or module:NAME)")
    if not isinstance(value, Mapping):
        raise UsageError(f"settings {source} is a {type(value).__name__}, not a dict")
    return value


def _short(value: str) -> str:
    """A short prefix of a token or proof: enough to tell two apart, never the whole value."""
    return value[:_PREFIX] + "..." if len(value) > _PREFIX else "(short value)"


# -- check -----------------------------------------------------------------------------------


def _finding(name: str, ok: bool, detail: str, fix: str = "") -> dict[str, Any]:
    return {"check": name, "ok": ok, "detail": detail, "fix": fix}


def run_check(raw: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every check ``check`` makes, as findings (``ok`` False for a problem, with its fix)."""
    try:
        settings = Settings.from_dict(raw)
    except ConfigurationError as exc:
        return [_finding("settings", False, str(exc), "correct the setting named above")]
    audience = ", ".join(settings.audience) or "-"
    findings = [
        _finding(
            "settings",
            True,
            f"valid: issuer {settings.issuer or '-'}, audience {audience}, mode {settings.mode}",
        )
    ]
    if settings.mode == "report_only":
        findings.append(
            _finding("mode", True, "report_only: refusals are logged, every request passes")
        )
    findings.append(_check_keys(settings))
    findings.append(_check_store(settings))
    return findings


def _check_keys(settings: Settings) -> dict[str, Any]:
    from dpop_middleware.core.keys import IssuerKeys
    from dpop_middleware.jwks import JWKSFetchError, fetch_jwks

    if settings.token_verifier is not None:
        return _finding("keys", True, "a token_verifier checks tokens (not exercised here)")
    if settings.token_source == "introspection":  # noqa: S105 - not a secret
        return _finding("keys", True, "every token is introspected (not exercised here)")
    document: Mapping[str, Any] | None = settings.jwks
    where = "the jwks setting"
    jwks_uri = settings.jwks_uri
    if document is None and jwks_uri is None:
        discovered = _discover(settings)
        if isinstance(discovered, dict):
            return discovered
        jwks_uri = discovered
    if jwks_uri is not None:
        where = jwks_uri
        try:
            document = fetch_jwks(jwks_uri, settings.jwks_fetch_timeout)
        except JWKSFetchError as exc:
            return _finding(
                "jwks",
                False,
                f"{where}: {exc} ({exc.__cause__ or 'no detail'})",
                "check that jwks_uri is right and reachable from this host (proxy, firewall, "
                "TLS certificates); the middleware answers 503 jwks_unavailable until it is",
            )
    assert document is not None
    keys = IssuerKeys(document, uri=None, cache_ttl=60, refresh_interval=60)
    try:
        keys.load(document, now=time.time())
    except ValueError as exc:
        return _finding(
            "jwks", False, f"{where}: not a usable JWK Set ({exc})", "publish public signing keys"
        )
    listed = document.get("keys", [])
    kids = [str(k.get("kid")) for k in listed if isinstance(k, Mapping) and "kid" in k]
    usable = len(keys.key_set or [])
    detail = f"{usable} usable key(s) from {where}" + (f" (kid {', '.join(kids)})" if kids else "")
    if usable == 0:
        return _finding("jwks", False, detail, "the JWK Set has no key the middleware can use")
    return _finding("jwks", True, detail)


def _discover(settings: Settings) -> str | dict[str, Any]:
    """The ``jwks_uri`` of the issuer's metadata (RFC 8414), or a failed finding."""
    from dpop_middleware.core.discovery import IssuerMetadata, MetadataError
    from dpop_middleware.fetch import FetchError, fetch_json

    assert settings.issuer is not None
    metadata = IssuerMetadata(settings.issuer, cache_ttl=60, refresh_interval=60)
    causes = []
    for url in metadata.urls:
        try:
            found = metadata.load(fetch_json(url, timeout=settings.jwks_fetch_timeout), now=0.0)
        except (FetchError, MetadataError) as exc:
            causes.append(f"{url}: {exc}")
            continue
        if found.jwks_uri is None:
            return _finding(
                "metadata", False, f"{url}: no jwks_uri", "set jwks_uri, or publish it there"
            )
        return found.jwks_uri
    return _finding(
        "metadata",
        False,
        "; ".join(causes),
        "check that issuer is exactly the authorization server's issuer and that its metadata "
        "is reachable from this host; the middleware answers 503 metadata_unavailable until it is",
    )


def _check_store(settings: Settings) -> dict[str, Any]:
    from dpop_middleware.replay import ReplayStore, _redact, create_sync_store

    config = settings.replay_store
    if config.kind == "memory":
        return _finding(
            "replay_store",
            True,
            "memory:// (this process only; with several workers or hosts use Redis)",
        )
    where = _redact(config.url) if config.url else type(config.client).__name__
    try:
        store = create_sync_store(config)
    except (ConfigurationError, ReplayStoreError) as exc:
        return _finding("replay_store", False, f"{where}: {_redact(str(exc))[:300]}", "")
    if not isinstance(store, ReplayStore):  # pragma: no cover - create_sync_store checks it
        return _finding("replay_store", False, f"{where}: not a sync store", "")
    try:
        # A real write, as the middleware makes: a random key that expires in a second.
        store.add(b"dpop-middleware-check:" + secrets.token_bytes(16), 1.0)
    except ReplayStoreError as exc:
        cause = exc.__cause__ or exc
        return _finding(
            "replay_store",
            False,
            f"{where}: {type(cause).__name__}: {_redact(str(cause))[:200]}",
            "start the store or correct replay_store; while it is down every protected request "
            "gets 503 replay_store_unavailable (fail closed)",
        )
    finally:
        if config.kind != "object":
            store.close()
    return _finding("replay_store", True, f"{where} answered a write")


# -- explain ---------------------------------------------------------------------------------


def _parse_header(value: str) -> tuple[str, str]:
    name, sep, content = value.partition(":")
    if not sep or not name.strip():
        raise UsageError(f"-H takes 'Name: value', got {value[:40]!r}")
    return name.strip().lower(), content.strip()


def build_request(
    line: str, headers: Sequence[str], dpop: str | None, token: str | None, peer: str | None
) -> Any:
    """The :class:`RequestInfo` the adapters would build for this request."""
    from dpop_middleware.core.request import RequestInfo

    method, _, url = line.strip().partition(" ")
    parts = urlsplit(url.strip())
    if not method or parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f'--request takes "METHOD http(s)://host/path", got {line[:60]!r}')
    if peer is not None:
        try:
            ipaddress.ip_address(peer)
        except ValueError:
            raise UsageError(f"--peer takes an IP address, got {peer[:40]!r}") from None
    given = [_parse_header(h) for h in headers]
    names = {name for name, _ in given}
    if "host" not in names:
        given.insert(0, ("host", parts.netloc))
    if token is not None:
        given.append(("authorization", f"DPoP {token}"))
    if dpop is not None:
        given.append(("dpop", dpop))
    return RequestInfo(
        method=method,
        scheme=parts.scheme,
        path=parts.path or "/",
        headers=tuple(given),
        query_string=parts.query,
        client_ip=peer,
    )


def _htu_source(settings: Settings, request: Any) -> str:
    from dpop_middleware.core.htu import _trusted

    if settings.public_url is not None:
        return "from public_url (the request's Host and forwarded headers are not used)"
    forwarded = [
        name
        for name in ("forwarded", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-prefix")
        if request.header_values(name)
    ]
    if not forwarded:
        return "from the request's scheme and Host header"
    if settings.trusted_proxies and _trusted(request.client_ip, settings.trusted_proxies):
        return f"from {', '.join(forwarded)} (the peer {request.client_ip} is a trusted proxy)"
    return (
        f"from the request's scheme and Host; {', '.join(forwarded)} ignored: the peer "
        f"{request.client_ip or '(none: --peer)'} is not in trusted_proxies"
    )


def _unverified_claims(jwt: str) -> dict[str, Any] | None:
    from dpop_middleware.core.jose import MalformedError, json_object

    parts = jwt.split(".")
    if len(parts) != 3:
        return None
    try:
        return json_object(parts[1])
    except MalformedError:
        return None


def _describe_proof(proof: str, now: float) -> dict[str, Any]:
    claims = _unverified_claims(proof) or {}
    iat = claims.get("iat")
    return {
        "prefix": _short(proof),
        "htm": claims.get("htm"),
        "htu": claims.get("htu"),
        "iat_age_seconds": round(now - iat) if isinstance(iat, int | float) else None,
        "has_ath": "ath" in claims,
        "has_nonce": "nonce" in claims,
    }


def _describe_token(token: str, now: float) -> dict[str, Any]:
    claims = _unverified_claims(token) or {}
    exp = claims.get("exp")
    cnf = claims.get("cnf")
    return {
        "prefix": _short(token),
        "iss": claims.get("iss"),
        "aud": claims.get("aud"),
        "expires_in_seconds": round(exp - now) if isinstance(exp, int | float) else None,
        "cnf_jkt": cnf.get("jkt") if isinstance(cnf, Mapping) else None,
    }


def run_explain(
    raw: Mapping[str, Any],
    line: str,
    headers: Sequence[str],
    dpop: str | None,
    token: str | None,
    peer: str | None,
) -> dict[str, Any]:
    """What the middleware would do with this request, step by step (see :data:`STEPS`)."""
    from dpop_middleware.core import headers as hdr
    from dpop_middleware.core.htu import request_htu
    from dpop_middleware.flow import Engine
    from dpop_middleware.replay import MemoryReplayStore

    try:
        settings = Settings.from_dict(raw)
    except ConfigurationError as exc:
        return {"ok": False, "settings_error": str(exc)}
    request = build_request(line, headers, dpop, token, peer)
    report: dict[str, Any] = {"request": f"{request.method} {line.strip().partition(' ')[2]}"}
    public = settings.public_url
    try:
        report["htu"] = request_htu(
            request,
            request.header_values("host"),
            (public.scheme, public.authority, public.prefix) if public else None,
            settings.trusted_proxies,
        )
        report["htu_source"] = _htu_source(settings, request)
    except DPoPError as exc:
        report["htu"] = None
        report["htu_source"] = f"{exc.reason}: {exc.description}"
    now = settings.clock()
    if dpop is not None:
        report["proof"] = _describe_proof(dpop, now)
    if token is not None:
        report["token"] = _describe_token(token, now)
    if dpop is None and token is None:
        report["ok"] = report["htu"] is not None
        return report
    # The real engine, with a throwaway replay store and no hook; report_only would hide the
    # refusal, so it is explained as "dpop" mode.
    quiet = dataclasses.replace(
        settings,
        on_refusal=None,
        mode="dpop" if settings.mode == "report_only" else settings.mode,
    )
    engine = Engine(quiet)
    logger = logging.getLogger("dpop_middleware")
    previous = logger.disabled
    logger.disabled = True  # the refusal is reported below, not logged
    try:
        outcome = engine.run_sync(request, MemoryReplayStore())
    finally:
        logger.disabled = previous
    if not engine.verifier.is_protected(request):
        report.update(ok=True, outcome="not protected (exclude_paths or CORS preflight)")
        report["steps"] = []
        return report
    error = outcome.refusal.error if outcome.refusal is not None else None
    scheme = hdr.scan_headers(request).authorization.partition(" ")[0].lower()
    report["steps"] = _steps(error, bearer=scheme == "bearer")
    if error is None:
        report.update(ok=True, outcome="accepted")
    else:
        report.update(
            ok=False,
            outcome=f"refused: {error.status} {error.error or '(no error code)'}",
            reason=error.reason,
        )
    return report


def _steps(error: DPoPError | None, *, bearer: bool) -> list[dict[str, Any]]:
    proof_steps = {"dpop_header", "proof", "htm", "htu", "ath", "freshness", "binding", "replay"}
    failed = None
    if error is not None:
        failed = next((name for name, _, codes in STEPS if error.reason in codes), "other")
    steps: list[dict[str, Any]] = []
    reached = True
    for name, what, _ in STEPS:
        if bearer and name in proof_steps:
            steps.append({"step": name, "result": "n/a", "detail": "Bearer: no proof"})
            continue
        if name == failed:
            assert error is not None
            detail = f"{error.reason}: {error.description}"
            if error.log_detail:
                detail += f" ({error.log_detail})"
            steps.append({"step": name, "result": "FAIL", "detail": detail})
            reached = False
        elif reached:
            if name == "replay":
                what += "; a fresh store here, the real one may have seen this jti"
            steps.append({"step": name, "result": "pass", "detail": what})
        else:
            steps.append({"step": name, "result": "-", "detail": "not reached"})
    if failed == "other":
        assert error is not None
        steps.append({"step": "other", "result": "FAIL", "detail": error.reason})
    return steps


# -- output ----------------------------------------------------------------------------------


def _print_check(findings: list[dict[str, Any]]) -> None:
    for item in findings:
        mark = "ok  " if item["ok"] else "FAIL"
        print(f"{mark}  {item['check']:<13} {item['detail']}")
        if item["fix"]:
            print(f"{'':19}fix: {item['fix']}")


def _print_explain(report: dict[str, Any]) -> None:
    if "settings_error" in report:
        print(f"settings  FAIL  {report['settings_error']}")
        return
    print(f"request   {report['request']}")
    print(f"htu       {report['htu'] or '(none: refused)'}")
    print(f"          {report['htu_source']}")
    proof = report.get("proof")
    if proof is not None:
        print(
            f"proof     {proof['prefix']}  htm={proof['htm']} htu={proof['htu']} "
            f"iat={proof['iat_age_seconds']}s ago ath={'yes' if proof['has_ath'] else 'no'} "
            f"nonce={'yes' if proof['has_nonce'] else 'no'}"
        )
    token = report.get("token")
    if token is not None:
        print(
            f"token     {token['prefix']}  iss={token['iss']} aud={token['aud']} "
            f"expires_in={token['expires_in_seconds']}s cnf.jkt={token['cnf_jkt']}"
        )
    if "steps" in report:
        print("checks")
        for step in report["steps"]:
            print(f"  {step['result']:<4}  {step['step']:<12} {step['detail']}")
        reason = f" (reason {report['reason']})" if "reason" in report else ""
        print(f"result    {report['outcome']}{reason}")


# -- the command -----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(USAGE, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="output JSON for scripts")
    top = _Parser(
        prog="dpop-middleware",
        description="Check and debug dpop-middleware settings; make DPoP keys and proofs.",
        epilog="exit codes: 0 ok, 1 a problem found, 2 usage error",
    )
    commands = top.add_subparsers(dest="command", required=True, parser_class=_Parser)
    check = commands.add_parser(
        "check", parents=[common], help="validate settings, fetch the JWK Set, ping the store"
    )
    check.add_argument("--settings", required=True, help="a JSON file, or module:NAME")
    explain = commands.add_parser(
        "explain", parents=[common], help="the htu and every check for one request"
    )
    explain.add_argument("--settings", required=True, help="a JSON file, or module:NAME")
    explain.add_argument("--request", required=True, help='"METHOD URL" as the client sent it')
    explain.add_argument(
        "-H", "--header", action="append", default=[], help='a header, "Name: value" (repeat)'
    )
    explain.add_argument("--dpop", help="the DPoP proof the client sent")
    explain.add_argument("--token", help="the access token the client sent (scheme DPoP)")
    explain.add_argument("--peer", help="the IP address of the directly connected peer")
    keygen = commands.add_parser("keygen", parents=[common], help="print a new private JWK")
    keygen.add_argument("--alg", default="ES256", help="ES256 (default), ES384, ES512, EdDSA, ...")
    proof = commands.add_parser("proof", parents=[common], help="print a DPoP proof")
    proof.add_argument("--key", required=True, help="a private JWK file (from keygen), or -")
    proof.add_argument("--method", required=True)
    proof.add_argument("--url", required=True)
    proof.add_argument("--token", help="adds ath for this access token")
    proof.add_argument("--nonce", help="the server's DPoP-Nonce")
    return top


def _load_key(source: str) -> Any:
    from dpop_middleware.client import DPoPKey

    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
        return DPoPKey.from_jwk(json.loads(text))
    except (OSError, ValueError, TypeError) as exc:
        # The message names the problem, never the key's content.
        raise UsageError(f"cannot load a private JWK from {source}: {type(exc).__name__}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code (argparse's own exits included, for callers that
    run it in-process)."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else USAGE
    try:
        return _run(args)
    except UsageError as exc:
        print(f"dpop-middleware: error: {exc}", file=sys.stderr)
        return USAGE


def _run(args: argparse.Namespace) -> int:
    if args.command == "check":
        findings = run_check(load_settings_source(args.settings))
        ok = all(item["ok"] for item in findings)
        if args.json:
            print(json.dumps({"ok": ok, "checks": findings}, indent=2))
        else:
            _print_check(findings)
        return OK if ok else PROBLEM
    if args.command == "explain":
        report = run_explain(
            load_settings_source(args.settings),
            args.request,
            args.header,
            args.dpop,
            args.token,
            args.peer,
        )
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            _print_explain(report)
        return OK if report["ok"] else PROBLEM
    from dpop_middleware.client import DPoPKey

    if args.command == "keygen":
        try:
            key = DPoPKey.generate(args.alg)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if args.json:
            print(json.dumps({"jwk": key.private_jwk, "jkt": key.jkt}))
        else:
            print(json.dumps(key.private_jwk))
        return OK
    key = _load_key(args.key)
    value = key.proof(args.method, args.url, access_token=args.token, nonce=args.nonce)
    print(json.dumps({"proof": value, "jkt": key.jkt}) if args.json else value)
    return OK


__all__ = ["STEPS", "build_request", "load_settings_source", "main", "run_check", "run_explain"]
