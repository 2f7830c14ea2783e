"""Every RFC 9449 section 4.3 proof check: send exactly that defect, assert status, error, reason."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import Any

import pytest
from conftest import API, FrozenClock
from core_helpers import Harness
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc.jwk import RSAKey

from dpop_middleware.core.jose import b64decode, b64encode
from dpop_middleware.testing import REMOVE, DPoPKey, TokenIssuer, sign_compact

URL = API + "/items"


@pytest.fixture
def h(make_settings: Any) -> Harness:
    return Harness(make_settings())


@pytest.fixture
def token(issuer: TokenIssuer, dpop_key: DPoPKey) -> str:
    return issuer.token(bound_to=dpop_key)


def raw_jws(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"sig") -> str:
    enc = lambda obj: b64encode(json.dumps(obj).encode())  # noqa: E731
    return f"{enc(header)}.{enc(payload)}.{b64encode(signature)}"


def claims(dpop_key: DPoPKey, token: str, clock: FrozenClock, **extra: Any) -> dict[str, Any]:
    body = {"jti": "j-" + str(clock.now), "htm": "GET", "htu": URL, "iat": int(clock.now),
            "ath": b64encode(hashlib.sha256(token.encode()).digest())}  # fmt: skip
    body.update(extra)
    return body


def send_proof(h: Harness, token: str, proof: str, method: str = "GET", url: str = URL) -> Any:
    return h.send(method, url, [("authorization", f"DPoP {token}"), ("dpop", proof)])


def expect(answer: Any, reason: str, error: str = "invalid_dpop_proof", status: int = 401) -> None:
    assert (answer.status, answer.error, answer.reason) == (status, error, reason)
    if status in (400, 401):
        params = answer.challenge_params()
        assert params["error"] == error
        assert "algs" in params


def test_valid_proof_passes(h: Harness, dpop_key: DPoPKey, token: str) -> None:
    answer = h.dpop(dpop_key, token, "GET", URL)
    assert answer.status == 200
    assert answer.outcome.result is not None
    assert answer.outcome.result.jkt == dpop_key.jkt


@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512", "RS256", "PS256", "EdDSA", "Ed25519"])
def test_every_default_algorithm_passes(make_settings: Any, issuer: TokenIssuer, alg: str) -> None:
    key = DPoPKey.generate(alg)
    token = issuer.token(bound_to=key)
    assert Harness(make_settings()).dpop(key, token, "GET", URL).status == 200


# -- step 1: one DPoP header ----------------------------------------------------------------------


def test_two_dpop_headers(h: Harness, dpop_key: DPoPKey, token: str) -> None:
    p1 = dpop_key.proof("GET", URL, access_token=token)
    p2 = dpop_key.proof("GET", URL, access_token=token)
    answer = h.send("GET", URL, [("authorization", f"DPoP {token}"), ("dpop", p1), ("dpop", p2)])
    expect(answer, "multiple_proofs")


def test_comma_merged_dpop_header_counts_as_two(h: Harness, dpop_key: DPoPKey, token: str) -> None:
    p1 = dpop_key.proof("GET", URL, access_token=token)
    answer = h.send("GET", URL, [("authorization", f"DPoP {token}"), ("dpop", f"{p1}, {p1}")])
    expect(answer, "multiple_proofs")


def test_missing_proof_with_dpop_scheme(h: Harness, token: str) -> None:
    expect(h.send("GET", URL, [("authorization", f"DPoP {token}")]), "proof_missing")


# -- step 2: a single well-formed JWT, size-limited -----------------------------------------------


@pytest.mark.parametrize(
    "proof",
    [
        pytest.param("not-a-jwt", id="garbage"),
        pytest.param("a.b", id="two-parts"),
        pytest.param("a.b.c.d", id="four-parts"),
        pytest.param("e30.e30.", id="empty-signature"),
        pytest.param("!!!.e30.c2ln", id="bad-base64-chars"),
        pytest.param(b64encode(b"[1]") + ".e30.c2ln", id="header-not-object"),
        pytest.param(b64encode(b"{bad json") + ".e30.c2ln", id="header-not-json"),
    ],
)
def test_malformed_proof(h: Harness, token: str, proof: str) -> None:
    expect(send_proof(h, token, proof), "proof_malformed")


def _segments(proof: str, index: int, change: Any) -> str:
    parts = proof.split(".")
    parts[index] = change(parts[index])
    return ".".join(parts)


@pytest.mark.parametrize(
    ("index", "change"),
    [
        pytest.param(2, lambda seg: seg + "=", id="padded-signature"),
        pytest.param(2, lambda seg: "+" + seg[1:], id="plus-in-signature"),
        pytest.param(2, lambda seg: "/" + seg[1:], id="slash-in-signature"),
        pytest.param(1, lambda seg: seg + "==", id="padded-payload"),
        pytest.param(1, lambda seg: seg[:4] + " " + seg[4:], id="space-in-payload"),
        pytest.param(1, lambda seg: seg[:4] + "\u00e9" + seg[4:], id="non-ascii-in-payload"),
        pytest.param(0, lambda seg: seg + "=", id="padded-header"),
        pytest.param(0, lambda seg: "/" + seg[1:], id="slash-in-header"),
    ],
)
def test_segments_are_strict_base64url(
    h: Harness, dpop_key: DPoPKey, token: str, index: int, change: Any
) -> None:
    """RFC 7515 section 2: base64url without padding. The good proof goes first, so its header
    segment is cached: the altered header must still be judged as a new string."""
    assert send_proof(h, token, dpop_key.proof("GET", URL, access_token=token)).status == 200
    proof = dpop_key.proof("GET", URL, access_token=token)
    expect(send_proof(h, token, _segments(proof, index, change)), "proof_malformed")


def test_infinite_iat_is_not_a_number(
    h: Harness, dpop_key: DPoPKey, token: str, clock: FrozenClock
) -> None:
    """``1e999`` is valid JSON that Python reads as ``inf``: not a usable ``iat``."""
    from joserfc import jws

    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": dpop_key.public_jwk}
    body = json.dumps({**claims(dpop_key, token, clock), "iat": 0}).replace('"iat": 0', '"iat": 1e999')
    proof = jws.serialize_compact(header, body.encode(), dpop_key.key, algorithms=["ES256"])
    expect(send_proof(h, token, proof), "iat_missing")


BIG_INT = "9" * 5000  # over CPython's 4300-digit int limit: int() raises a plain ValueError


def test_header_with_a_huge_number_is_malformed_not_a_crash(h: Harness, token: str) -> None:
    """The header is parsed before the signature is checked: anyone can send this."""
    head = b64encode(('{"typ":"dpop+jwt","alg":"ES256","x":' + BIG_INT + "}").encode())
    proof = f"{head}.{b64encode(b'{}')}.{b64encode(b'sig')}"
    expect(send_proof(h, token, proof), "proof_malformed")


def test_signed_payload_with_a_huge_number_is_malformed_not_a_crash(
    h: Harness, dpop_key: DPoPKey, token: str, clock: FrozenClock
) -> None:
    """Any client can sign such a payload with its own key."""
    from joserfc import jws

    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": dpop_key.public_jwk}
    body = json.dumps({**claims(dpop_key, token, clock), "iat": 0}).replace('"iat": 0', '"iat": ' + BIG_INT)
    proof = jws.serialize_compact(header, body.encode(), dpop_key.key, algorithms=["ES256"])
    expect(send_proof(h, token, proof), "proof_malformed")


DEEP = "[" * 2000 + "]" * 2000  # past the JSON decoder's depth, within the 8 KB proof limit


def test_header_nested_deep_is_malformed_not_a_crash(h: Harness, token: str) -> None:
    """RecursionError in the JSON decoder; anyone can send this header."""
    head = b64encode(('{"typ":"dpop+jwt","alg":"ES256","x":' + DEEP + "}").encode())
    proof = f"{head}.{b64encode(b'{}')}.{b64encode(b'sig')}"
    expect(send_proof(h, token, proof), "proof_malformed")


@pytest.mark.parametrize(
    "nested",
    [
        pytest.param(DEEP, id="arrays-2000-deep"),
        # The JSON decoder takes these; walking them to freeze the claims does not.
        pytest.param("[" * 900 + "]" * 900, id="arrays-900-deep"),
    ],
)
def test_signed_payload_nested_deep_is_malformed_not_a_crash(
    h: Harness, dpop_key: DPoPKey, token: str, clock: FrozenClock, nested: str
) -> None:
    from joserfc import jws

    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": dpop_key.public_jwk}
    body = json.dumps(claims(dpop_key, token, clock))[:-1] + ', "x": ' + nested + "}"
    proof = jws.serialize_compact(header, body.encode(), dpop_key.key, algorithms=["ES256"])
    expect(send_proof(h, token, proof), "proof_malformed")


def test_oversized_proof_refused_before_parsing(h: Harness, token: str) -> None:
    expect(send_proof(h, token, "a" * 9000), "proof_too_large")


def test_duplicate_claims_are_malformed(
    h: Harness, dpop_key: DPoPKey, token: str, clock: FrozenClock
) -> None:
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": dpop_key.public_jwk}
    body = json.dumps(claims(dpop_key, token, clock))[:-1] + ', "htm": "POST"}'
    from joserfc import jws

    proof = jws.serialize_compact(header, body.encode(), dpop_key.key, algorithms=["ES256"])
    expect(send_proof(h, token, proof), "proof_malformed")


# -- steps 3 to 7: claims, typ, alg, signature, jwk -----------------------------------------------


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        pytest.param({"jti": REMOVE}, "jti_missing", id="no-jti"),
        pytest.param({"jti": ""}, "jti_missing", id="empty-jti"),
        pytest.param({"jti": "x" * 129}, "jti_too_long", id="long-jti"),
        pytest.param({"htm": REMOVE}, "htm_missing", id="no-htm"),
        pytest.param({"htu": REMOVE}, "htu_missing", id="no-htu"),
        pytest.param({"iat": REMOVE}, "iat_missing", id="no-iat"),
        pytest.param({"iat": "1700000000"}, "iat_missing", id="string-iat"),
        pytest.param({"iat": True}, "iat_missing", id="bool-iat"),
        pytest.param({"ath": REMOVE}, "ath_missing", id="no-ath"),
        pytest.param({"ath": 5}, "ath_invalid", id="numeric-ath"),
        pytest.param({"ath": "x" * 43}, "ath_mismatch", id="wrong-ath"),
        pytest.param({"htm": "get"}, "htm_mismatch", id="htm-lowercase"),
        pytest.param({"htm": "POST"}, "htm_mismatch", id="htm-other"),
        pytest.param({"htu": "https://other.example/items"}, "htu_mismatch", id="htu-other-host"),
        pytest.param({"htu": API + "/items/"}, "htu_mismatch", id="htu-trailing-slash"),
        pytest.param({"htu": API + "/Items"}, "htu_mismatch", id="htu-path-case"),
        pytest.param({"htu": API + ":8443/items"}, "htu_mismatch", id="htu-other-port"),
        pytest.param({"htu": "/items"}, "htu_invalid", id="htu-relative"),
        pytest.param({"htu": "https://x@api.example/items"}, "htu_invalid", id="htu-userinfo"),
        pytest.param({"htu": "ftp://api.example/items"}, "htu_invalid", id="htu-ftp"),
        pytest.param({"nonce": 5}, "nonce_invalid_type", id="numeric-nonce"),
        pytest.param({"iat": 10**400}, "iat_in_future", id="iat-beyond-any-float"),
        pytest.param({"iat": -(10**400)}, "iat_too_old", id="iat-below-any-float"),
    ],
)
def test_claim_defects(
    h: Harness, dpop_key: DPoPKey, token: str, override: dict[str, Any], reason: str
) -> None:
    proof = dpop_key.proof("GET", URL, access_token=token, claims=override)
    expect(send_proof(h, token, proof), reason)


@pytest.mark.parametrize(
    ("htu", "status"),
    [
        pytest.param(API + "/items?x=1#frag", 200, id="query-and-fragment-ignored"),
        pytest.param("HTTPS://API.EXAMPLE:443/items", 200, id="scheme-host-case-default-port"),
        pytest.param(API + "/a/../items", 200, id="dot-segments"),
        pytest.param(API + "/%69tems", 200, id="unreserved-escape-decoded"),
    ],
)
def test_htu_normalisation(
    h: Harness, dpop_key: DPoPKey, token: str, htu: str, status: int
) -> None:
    proof = dpop_key.proof("GET", URL, access_token=token, claims={"htu": htu})
    assert send_proof(h, token, proof).status == status


@pytest.mark.parametrize(
    ("path", "htu", "reason"),
    [
        pytest.param("/%f%42", "/%f%42", None, id="as-sent"),
        pytest.param("/%f%42", "/%25fB", None, id="stray-percent-is-the-character"),
        pytest.param("/%f%42", "/%fB", "htu_mismatch", id="not-the-escape-it-makes"),
        pytest.param("/%2%2%44", "/%2%2D", "htu_mismatch", id="not-the-escape-it-makes-2"),
    ],
)
def test_a_stray_percent_never_combines_with_a_decoded_escape(
    h: Harness, dpop_key: DPoPKey, token: str, path: str, htu: str, reason: str | None
) -> None:
    """Decoding ``%42`` to ``B`` after a stray ``%`` must not make the escape ``%fB``: an htu equal
    to the request URI skips normalising, so the two ways must agree (RFC 3986 section 2.4)."""
    proof = dpop_key.proof("GET", API + htu, access_token=token)
    answer = send_proof(h, token, proof, url=API + path)
    if reason is None:
        assert answer.status == 200
    else:
        expect(answer, reason)


def test_htu_escapes_compare_case_insensitively(
    make_settings: Any, dpop_key: DPoPKey, issuer: TokenIssuer
) -> None:
    h = Harness(make_settings())
    token = issuer.token(bound_to=dpop_key)
    proof = dpop_key.proof("GET", API + "/a%2fb", access_token=token)
    answer = h.send("GET", API + "/a%2Fb", [("authorization", f"DPoP {token}"), ("dpop", proof)])
    assert answer.status == 200


def test_typ_jwt_is_refused(h: Harness, dpop_key: DPoPKey, token: str) -> None:
    proof = dpop_key.proof("GET", URL, access_token=token, header={"typ": "JWT"})
    expect(send_proof(h, token, proof), "typ_invalid")


def test_typ_missing_is_refused(h: Harness, dpop_key: DPoPKey, token: str) -> None:
    proof = dpop_key.proof("GET", URL, access_token=token, header={"typ": REMOVE})
    expect(send_proof(h, token, proof), "typ_invalid")


def test_alg_none_is_refused(h: Harness, dpop_key: DPoPKey, token: str, clock: FrozenClock) -> None:
    header = {"typ": "dpop+jwt", "alg": "none", "jwk": dpop_key.public_jwk}
    expect(send_proof(h, token, raw_jws(header, claims(dpop_key, token, clock))), "alg_not_allowed")


def test_hs256_is_refused(h: Harness, dpop_key: DPoPKey, token: str, clock: FrozenClock) -> None:
    header = {"typ": "dpop+jwt", "alg": "HS256", "jwk": {"kty": "oct", "k": "c2VjcmV0"}}
    unsigned = raw_jws(header, claims(dpop_key, token, clock)).rsplit(".", 1)[0]
    mac = hmac.new(b"secret", unsigned.encode(), hashlib.sha256).digest()
    expect(send_proof(h, token, f"{unsigned}.{b64encode(mac)}"), "alg_not_allowed")


def test_alg_outside_local_policy(make_settings: Any, issuer: TokenIssuer) -> None:
    key = DPoPKey.generate("RS256")
    token = issuer.token(bound_to=key)
    h = Harness(make_settings(algorithms=["ES256"]))
    answer = h.dpop(key, token, "GET", URL)
    expect(answer, "alg_not_allowed")
    assert answer.challenge_params()["algs"] == "ES256"


def test_crit_header_is_refused(
    h: Harness, dpop_key: DPoPKey, token: str, clock: FrozenClock
) -> None:
    header = {
        "typ": "dpop+jwt",
        "alg": "ES256",
        "jwk": dpop_key.public_jwk,
        "crit": ["exp"],
        "exp": 1,
    }
    expect(
        send_proof(h, token, raw_jws(header, claims(dpop_key, token, clock))), "crit_unsupported"
    )


def test_jwk_missing(h: Harness, dpop_key: DPoPKey, token: str) -> None:
    proof = dpop_key.proof("GET", URL, access_token=token, header={"jwk": REMOVE})
    expect(send_proof(h, token, proof), "jwk_missing")


@pytest.mark.parametrize("member", ["d", "p", "q", "dp", "dq", "qi", "oth", "k"])
def test_jwk_with_private_member(h: Harness, dpop_key: DPoPKey, token: str, member: str) -> None:
    jwk = {**dpop_key.public_jwk, member: "AAAA"}
    proof = dpop_key.proof("GET", URL, access_token=token, header={"jwk": jwk})
    expect(send_proof(h, token, proof), "jwk_private")


def test_real_private_jwk_is_refused(h: Harness, dpop_key: DPoPKey, token: str) -> None:
    private = dict(dpop_key.key.as_dict(private=True))
    proof = dpop_key.proof("GET", URL, access_token=token, header={"jwk": private})
    expect(send_proof(h, token, proof), "jwk_private")


@pytest.mark.parametrize(
    ("alg", "jwk_from"),
    [
        pytest.param("ES384", "ES256", id="es384-with-p256"),
        pytest.param("ES256", "RS256", id="es256-with-rsa"),
        pytest.param("RS256", "ES256", id="rs256-with-ec"),
        pytest.param("EdDSA", "ES256", id="eddsa-with-ec"),
    ],
)
def test_alg_and_key_type_must_match(
    h: Harness, token: str, clock: FrozenClock, alg: str, jwk_from: str
) -> None:
    other = DPoPKey.generate(jwk_from)
    header = {"typ": "dpop+jwt", "alg": alg, "jwk": other.public_jwk}
    expect(send_proof(h, token, raw_jws(header, claims(other, token, clock))), "jwk_invalid")


def test_jwk_alg_member_must_match(h: Harness, dpop_key: DPoPKey, token: str) -> None:
    jwk = {**dpop_key.public_jwk, "alg": "ES384"}
    proof = dpop_key.proof("GET", URL, access_token=token, header={"jwk": jwk})
    expect(send_proof(h, token, proof), "jwk_invalid")


def test_point_not_on_curve(h: Harness, dpop_key: DPoPKey, token: str, clock: FrozenClock) -> None:
    jwk = {**dpop_key.public_jwk, "y": dpop_key.public_jwk["x"]}
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk}
    expect(send_proof(h, token, raw_jws(header, claims(dpop_key, token, clock))), "jwk_invalid")


def test_rsa_key_under_2048_bits(
    make_settings: Any, issuer: TokenIssuer, clock: FrozenClock
) -> None:
    small = RSAKey.import_key(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    key = DPoPKey(small, "RS256")
    token = issuer.token(bound_to=key)
    header = {"typ": "dpop+jwt", "alg": "RS256", "jwk": key.public_jwk}
    proof = sign_compact(header, claims(key, token, clock), small, "RS256")
    expect(send_proof(Harness(make_settings()), token, proof), "jwk_invalid")


def _int_b64(value: int) -> str:
    return b64encode(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def _odd(bits: int) -> int:
    """An odd number of exactly ``bits`` bits (a modulus-shaped value; nobody has its key)."""
    return secrets.randbits(bits) | (1 << (bits - 1)) | 1


@pytest.mark.parametrize(
    ("n", "e", "reason"),
    [
        pytest.param(_int_b64(_odd(16384)), "AQAB", "jwk_invalid", id="n-16384-bits"),
        pytest.param(_int_b64(_odd(8193)), "AQAB", "jwk_invalid", id="n-8193-bits"),
        pytest.param(_int_b64(_odd(3072)), _int_b64(_odd(3071)), "jwk_invalid", id="e-3071-bits"),
        pytest.param(_int_b64(_odd(2048)), _int_b64(2**32 + 1), "jwk_invalid", id="e-over-2**32"),
        pytest.param(_int_b64(_odd(2048)), _int_b64(65536), "jwk_invalid", id="e-even"),
        pytest.param(_int_b64(_odd(2048)), _int_b64(1), "jwk_invalid", id="e-1"),
        pytest.param(_int_b64(_odd(2047)), "AQAB", "jwk_invalid", id="n-2047-bits"),
        # At the bounds: the key is usable, only the random signature is wrong.
        pytest.param(_int_b64(_odd(8192)), "AQAB", "signature_invalid", id="n-8192-bits"),
        pytest.param(
            "AAAA" + _int_b64(_odd(8192)), "AQAB", "signature_invalid", id="n-8192-leading-zeros"
        ),
        pytest.param(
            _int_b64(_odd(2048)), _int_b64(2**32 - 1), "signature_invalid", id="e-2**32-1"
        ),
        pytest.param(_int_b64(_odd(2048)), "AAAD", "signature_invalid", id="e-3-leading-zeros"),
    ],
)
def test_rsa_proof_key_bounds(
    h: Harness, dpop_key: DPoPKey, token: str, clock: FrozenClock, n: str, e: str, reason: str
) -> None:
    """Anyone can send a huge key with a random signature: refused before any import or signature
    work (a 16,384-bit ``n`` or a 3,072-bit ``e`` cost milliseconds per signature check)."""
    header = {"typ": "dpop+jwt", "alg": "RS256", "jwk": {"kty": "RSA", "n": n, "e": e}}
    proof = raw_jws(header, claims(dpop_key, token, clock), secrets.token_bytes(256))
    answer = send_proof(h, token, proof)
    expect(answer, reason)
    if reason == "jwk_invalid":  # the operator's log line says which bound, never the key
        assert answer.outcome.refusal.error.log_detail["jwk"].startswith("RSA ")


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"n": 12345}, id="n-number"),
        pytest.param({"e": 65537}, id="e-number"),
        pytest.param({"n": ["AQAB"]}, id="n-list"),
        pytest.param({"e": None}, id="e-null"),
        pytest.param({"n": REMOVE}, id="n-missing"),
        pytest.param({"e": REMOVE}, id="e-missing"),
        pytest.param({"n": ""}, id="n-empty"),
        pytest.param({"e": ""}, id="e-empty"),
        pytest.param({"e": "AQAB="}, id="e-padded"),
        pytest.param({"e": "AQ AB"}, id="e-space"),
        pytest.param({"e": "AQ+B"}, id="e-plus"),
        pytest.param({"e": "A"}, id="e-one-character"),
        pytest.param({"e": "\u00e9"}, id="e-non-ascii"),
    ],
)
def test_malformed_rsa_jwk_members(
    h: Harness, dpop_key: DPoPKey, token: str, clock: FrozenClock, change: dict[str, Any]
) -> None:
    jwk = {"kty": "RSA", "n": _int_b64(_odd(2048)), "e": "AQAB"}
    for name, value in change.items():
        if value is REMOVE:
            del jwk[name]
        else:
            jwk[name] = value
    header = {"typ": "dpop+jwt", "alg": "RS256", "jwk": jwk}
    proof = raw_jws(header, claims(dpop_key, token, clock), secrets.token_bytes(256))
    expect(send_proof(h, token, proof), "jwk_invalid")


@pytest.mark.parametrize("member", ["n", "e"])
def test_rsa_jwk_with_a_leading_zero_octet_passes(
    make_settings: Any, issuer: TokenIssuer, clock: FrozenClock, member: str
) -> None:
    """Leading zero octets do not change the value: the key is usable (its thumbprint is that of
    the members as sent, RFC 7638 section 3)."""
    key = DPoPKey.generate("RS256")
    jwk = key.public_jwk
    jwk[member] = b64encode(b"\x00" + b64decode(jwk[member]))
    token = issuer.token(bound_to=RSAKey.import_key(jwk).thumbprint())
    header = {"typ": "dpop+jwt", "alg": "RS256", "jwk": jwk}
    proof = sign_compact(header, claims(key, token, clock), key.key, "RS256")
    assert send_proof(Harness(make_settings()), token, proof).status == 200


def test_tampered_payload_fails_signature(h: Harness, dpop_key: DPoPKey, token: str) -> None:
    proof = dpop_key.proof("GET", URL, access_token=token)
    head, _, sig = proof.split(".")
    forged = b64encode(json.dumps({"jti": "x", "htm": "GET", "htu": URL, "iat": 1}).encode())
    expect(send_proof(h, token, f"{head}.{forged}.{sig}"), "signature_invalid")


def test_signed_by_another_key_than_the_jwk(
    h: Harness, dpop_key: DPoPKey, other_key: DPoPKey, token: str
) -> None:
    # the header claims dpop_key's jwk, but other_key signs
    proof = other_key.proof("GET", URL, access_token=token, header={"jwk": dpop_key.public_jwk})
    expect(send_proof(h, token, proof), "signature_invalid")


def test_wrong_signature_length(h: Harness, dpop_key: DPoPKey, token: str) -> None:
    proof = dpop_key.proof("GET", URL, access_token=token)
    expect(send_proof(h, token, proof[:-4]), "signature_invalid")


# -- step 11: iat window --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "reason"),
    [
        pytest.param(-60, None, id="oldest-accepted"),
        pytest.param(-61, "iat_too_old", id="too-old"),
        pytest.param(10, None, id="furthest-future-accepted"),
        pytest.param(11, "iat_in_future", id="too-far-in-future"),
    ],
)
def test_iat_window(
    h: Harness, dpop_key: DPoPKey, token: str, clock: FrozenClock, offset: int, reason: str | None
) -> None:
    proof = dpop_key.proof("GET", URL, access_token=token, iat=clock.now + offset)
    answer = send_proof(h, token, proof)
    if reason is None:
        assert answer.status == 200
    else:
        expect(answer, reason)


# -- replay (section 11.1) ------------------------------------------------------------------------


def test_replay_is_refused(h: Harness, dpop_key: DPoPKey, token: str) -> None:
    proof = dpop_key.proof("GET", URL, access_token=token)
    assert send_proof(h, token, proof).status == 200
    expect(send_proof(h, token, proof), "replayed")


def test_refused_request_does_not_burn_the_jti(h: Harness, dpop_key: DPoPKey, token: str) -> None:
    proof = dpop_key.proof("GET", URL, access_token=token)
    expect(send_proof(h, token, proof, method="POST"), "htm_mismatch")
    assert send_proof(h, token, proof).status == 200


def test_same_jti_from_two_keys_does_not_collide(
    make_settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey, other_key: DPoPKey
) -> None:
    h = Harness(make_settings())
    for key in (dpop_key, other_key):
        token = issuer.token(bound_to=key)
        assert h.dpop(key, token, "GET", URL, jti="same-jti").status == 200


def test_replay_ttl_covers_the_acceptance_window(
    h: Harness, dpop_key: DPoPKey, token: str, clock: FrozenClock
) -> None:
    """A proof minted at the far-future edge stays acceptable for max_age + skew: so is its jti."""
    proof = dpop_key.proof("GET", URL, access_token=token, iat=clock.now + 10)
    assert send_proof(h, token, proof).status == 200
    clock.advance(69)  # iat is now 59 s old: still inside the window
    expect(send_proof(h, token, proof), "replayed")
    pending_ttl = h.settings.replay_ttl
    assert pending_ttl >= h.settings.proof_max_age + h.settings.clock_skew


def test_memory_store_refuses_when_full(
    make_settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    h = Harness(make_settings(replay_store={"url": "memory://", "max_entries": 2}))
    token = issuer.token(bound_to=dpop_key)
    assert h.dpop(dpop_key, token, "GET", URL).status == 200
    assert h.dpop(dpop_key, token, "GET", URL).status == 200
    answer = h.dpop(dpop_key, token, "GET", URL)
    assert (answer.status, answer.error, answer.reason) == (
        503, "temporarily_unavailable", "replay_store_unavailable",
    )  # fmt: skip
    assert answer.header("retry-after") == ["1"]


def test_memory_store_size_from_settings_is_used(make_settings: Any) -> None:
    h = Harness(make_settings(replay_store="memory://?max_entries=5"))
    assert h.store.max_entries == 5  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        pytest.param({"ath": "\u00e9" * 43}, "ath_mismatch", id="non-ascii-ath"),
        pytest.param({"ath": "\ud800"}, "ath_mismatch", id="surrogate-ath"),
        pytest.param({"htu": "https://api.example/\ud800"}, "htu_invalid", id="surrogate-htu"),
        pytest.param({"htu": "https://\u00e9xample/items"}, "htu_invalid", id="non-ascii-host"),
        pytest.param({"htm": "G\u00c9T"}, "htm_mismatch", id="non-ascii-htm"),
        pytest.param({"nonce": "\u00e9"}, None, id="non-ascii-nonce-ignored-when-off"),
    ],
)
def test_signed_proofs_with_odd_strings_are_refused_not_crashed(
    h: Harness, dpop_key: DPoPKey, token: str, override: dict[str, Any], reason: str | None
) -> None:
    """The fuzz tests cannot get past the signature; these are validly signed."""
    proof = dpop_key.proof("GET", URL, access_token=token, claims=override)
    answer = send_proof(h, token, proof)
    if reason is None:
        assert answer.status == 200
    else:
        expect(answer, reason)


def test_signed_proof_with_surrogate_jti_passes_once(
    h: Harness, dpop_key: DPoPKey, token: str
) -> None:
    proof = dpop_key.proof("GET", URL, access_token=token, jti="\ud800-jti")
    assert send_proof(h, token, proof).status == 200
    expect(send_proof(h, token, proof), "replayed")
