"""The test kit itself: proofs it mints pass the core, tokens carry the right binding, serve() runs."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from dpop_middleware import Settings
from dpop_middleware.core.jose import json_object
from dpop_middleware.core.request import RequestInfo
from dpop_middleware.flow import Engine, Outcome
from dpop_middleware.replay import MemoryReplayStore
from dpop_middleware.testing import REMOVE, DPoPKey, TokenIssuer, ath_for, serve

# EdDSA is a deliberate choice here (joserfc warns that RFC 9864 deprecates the name).
pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated")

API = "https://api.example"
URL = API + "/items"


def claims_of(jwt: str) -> dict[str, Any]:
    return json_object(jwt.split(".")[1])


def header_of(jwt: str) -> dict[str, Any]:
    return json_object(jwt.split(".")[0])


class Core:
    """The verification core behind one issuer, with a memory replay store."""

    def __init__(self, issuer: TokenIssuer, **extra: Any) -> None:
        self.engine = Engine(Settings.from_dict(issuer.settings(**extra)))
        self.store = MemoryReplayStore()

    def send(self, method: str, url: str, headers: dict[str, str]) -> Outcome:
        parts = urlsplit(url)
        info = RequestInfo(
            method=method,
            scheme=parts.scheme,
            path=parts.path or "/",
            headers=(("host", parts.netloc), *((k.lower(), v) for k, v in headers.items())),
            query_string=parts.query,
        )
        return self.engine.run_sync(info, self.store)


def refused(outcome: Outcome) -> tuple[int, str | None, str]:
    assert outcome.refusal is not None, "expected a refusal"
    error = outcome.refusal.error
    return outcome.refusal.status, error.error, error.reason


@pytest.fixture
def issuer() -> TokenIssuer:
    return TokenIssuer(audience=API)


@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512", "EdDSA", "Ed25519", "RS256", "PS256"])
def test_proofs_of_every_algorithm_verify(alg: str, issuer: TokenIssuer) -> None:
    key = DPoPKey.generate(alg)
    token = issuer.token(bound_to=key)
    core = Core(issuer, algorithms=[alg])
    proof = key.proof("GET", URL + "?page=2", access_token=token)
    outcome = core.send("GET", URL + "?page=2", {"Authorization": f"DPoP {token}", "DPoP": proof})
    assert outcome.refusal is None
    assert outcome.result is not None
    assert outcome.result.jkt == key.jkt
    assert outcome.result.claims["cnf"] == {"jkt": key.jkt}
    assert header_of(proof)["alg"] == alg


def test_proof_claims_and_header(dpop_key: DPoPKey) -> None:
    proof = dpop_key.proof("POST", URL + "?q=1#frag", access_token="tok", nonce="n-1")
    claims, header = claims_of(proof), header_of(proof)
    assert header == {"typ": "dpop+jwt", "alg": "ES256", "jwk": dpop_key.public_jwk}
    assert "d" not in header["jwk"]
    assert claims["htm"] == "POST"
    assert claims["htu"] == URL  # query and fragment dropped (RFC 9449 section 4.2)
    assert claims["ath"] == ath_for("tok")
    assert claims["nonce"] == "n-1"
    assert len(claims["jti"]) >= 16
    assert claims_of(dpop_key.proof("GET", URL))["jti"] != claims_of(proof)["jti"]


def test_overrides_for_negative_tests(dpop_key: DPoPKey) -> None:
    proof = dpop_key.proof(
        "GET",
        URL,
        iat=1000,
        jti="fixed",
        htu="https://elsewhere.example/x?y",
        claims={"htm": "PUT", "extra": 1, "jti": REMOVE},
        header={"typ": "jwt", "jwk": REMOVE},
    )
    claims, header = claims_of(proof), header_of(proof)
    assert claims == {"htm": "PUT", "htu": "https://elsewhere.example/x?y", "iat": 1000, "extra": 1}
    assert header == {"typ": "jwt", "alg": "ES256"}


@pytest.mark.parametrize(
    ("overrides", "error", "reason"),
    [
        pytest.param({"htu": API + "/other"}, "invalid_dpop_proof", "htu_mismatch", id="htu"),
        pytest.param({"iat": 1}, "invalid_dpop_proof", "iat_too_old", id="iat"),
        pytest.param({"claims": {"htm": "POST"}}, "invalid_dpop_proof", "htm_mismatch", id="htm"),
        pytest.param({"jti": "x" * 200}, "invalid_dpop_proof", "jti_too_long", id="jti"),
        pytest.param({"access_token": "another"}, "invalid_dpop_proof", "ath_mismatch", id="ath"),
        pytest.param({"header": {"typ": "jwt"}}, "invalid_dpop_proof", "typ_invalid", id="typ"),
    ],
)
def test_overridden_proofs_are_refused_by_the_core(
    overrides: dict[str, Any], error: str, reason: str, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    token = issuer.token(bound_to=dpop_key)
    proof = dpop_key.proof("GET", URL, **{"access_token": token, **overrides})
    outcome = Core(issuer).send("GET", URL, {"Authorization": f"DPoP {token}", "DPoP": proof})
    assert refused(outcome) == (401, error, reason)


def test_same_jti_is_a_replay(issuer: TokenIssuer, dpop_key: DPoPKey) -> None:
    core = Core(issuer)
    token = issuer.token(bound_to=dpop_key)
    for expected in (None, "replayed"):
        proof = dpop_key.proof("GET", URL, access_token=token, jti="same-jti-0123456789")
        outcome = core.send("GET", URL, {"Authorization": f"DPoP {token}", "DPoP": proof})
        assert (None if outcome.refusal is None else outcome.refusal.error.reason) == expected


def test_key_thumbprint_is_rfc7638() -> None:
    # RFC 7638 section 3.1 example key and thumbprint.
    jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
    }
    from joserfc.jwk import RSAKey

    key = DPoPKey(RSAKey.import_key(jwk), "RS256")
    assert key.jkt == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    assert key.public_jwk == jwk


@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "PS256"])
def test_private_jwk_round_trip(alg: str) -> None:
    key = DPoPKey.generate(alg)
    stored = json.loads(json.dumps(key.private_jwk))
    assert stored["alg"] == alg and "d" in stored
    loaded = DPoPKey.from_jwk(stored)
    assert (loaded.alg, loaded.jkt) == (alg, key.jkt)
    assert claims_of(loaded.proof("GET", URL))["htu"] == URL


def test_from_jwk_infers_alg_from_the_curve_and_refuses_what_it_cannot_use() -> None:
    ec = DPoPKey.generate("ES384").key.as_dict(private=True)
    assert DPoPKey.from_jwk(ec).alg == "ES384"
    okp = DPoPKey.generate("EdDSA").key.as_dict(private=True)
    assert DPoPKey.from_jwk(okp).alg == "EdDSA"
    rsa = DPoPKey.generate("RS256").key.as_dict(private=True)
    with pytest.raises(ValueError, match="alg="):
        DPoPKey.from_jwk(rsa)
    assert DPoPKey.from_jwk(rsa, "PS256").alg == "PS256"
    with pytest.raises(ValueError, match="private"):
        DPoPKey.from_jwk(DPoPKey.generate().public_jwk)
    with pytest.raises(ValueError, match="EC, OKP or RSA"):
        DPoPKey.from_jwk({"kty": "oct", "k": "c2VjcmV0", "d": "x"})
    with pytest.raises(ValueError, match="alg must be one of"):
        DPoPKey.from_jwk(ec, "HS256")


def test_generate_refuses_unknown_algorithms() -> None:
    with pytest.raises(ValueError, match="alg must be one of"):
        DPoPKey.generate("none")
    with pytest.raises(ValueError, match="alg must be one of"):
        TokenIssuer(alg="HS256")


def test_repr_shows_no_private_key(dpop_key: DPoPKey) -> None:
    assert repr(dpop_key) == f"DPoPKey(alg='ES256', jkt={dpop_key.jkt!r})"
    assert dpop_key.private_jwk["d"] not in repr(dpop_key)


def test_token_is_rfc9068_and_bound(issuer: TokenIssuer, dpop_key: DPoPKey) -> None:
    issuer.clock = lambda: 1_700_000_000
    token = issuer.token(bound_to=dpop_key, lifetime=120, claims={"scope": "read write"})
    header, claims = header_of(token), claims_of(token)
    assert header == {"typ": "at+jwt", "alg": "ES256", "kid": "test-key-1"}
    assert claims["cnf"] == {"jkt": dpop_key.jkt}
    assert claims["iss"] == issuer.issuer and claims["aud"] == API
    assert (claims["iat"], claims["exp"]) == (1_700_000_000, 1_700_000_120)
    assert claims["scope"] == "read write"
    assert {"sub", "client_id", "jti"} <= set(claims)
    assert claims_of(issuer.token(bound_to="some-jkt"))["cnf"] == {"jkt": "some-jkt"}
    assert "cnf" not in claims_of(issuer.token())
    assert "sub" not in claims_of(issuer.token(claims={"sub": REMOVE}))


def test_jwks_holds_the_public_key_under_its_kid() -> None:
    issuer = TokenIssuer(kid="k-7", alg="EdDSA")
    (jwk,) = issuer.jwks["keys"]
    assert (jwk["kid"], jwk["alg"], jwk["use"], jwk["kty"]) == ("k-7", "EdDSA", "sig", "OKP")
    assert "d" not in jwk
    assert header_of(issuer.token())["kid"] == "k-7"


def test_tokens_of_another_issuer_key_are_refused(issuer: TokenIssuer, dpop_key: DPoPKey) -> None:
    forger = TokenIssuer(audience=API)  # same iss, aud and kid; another signing key
    token = forger.token(bound_to=dpop_key)
    proof = dpop_key.proof("GET", URL, access_token=token)
    status, error, _ = refused(
        Core(issuer).send("GET", URL, {"Authorization": f"DPoP {token}", "DPoP": proof})
    )
    assert (status, error) == (401, "invalid_token")


def test_serve_runs_an_app_on_loopback_and_stops_it() -> None:
    events: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                events.append(message["type"])
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"hello"})

    with serve(app) as base_url:
        assert base_url.startswith("http://127.0.0.1:")
        assert httpx.get(base_url + "/").text == "hello"
    assert events == ["lifespan.startup", "lifespan.shutdown"]
    with pytest.raises(httpx.ConnectError):
        httpx.get(base_url + "/")
