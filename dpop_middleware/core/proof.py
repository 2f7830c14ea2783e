"""DPoP proof checks (RFC 9449 section 4.3).

The section lists twelve checks "performed in any order". Here they run cheapest-first on the
header (cached per distinct header), then the signature, then the claims, so that a claim is
only ever judged on a proof whose signature is good and the log line names the real defect.

Step 1 (one ``DPoP`` header) is in :mod:`headers`; steps 9 to 12 need the request, the nonce
state and the access token, and live in :func:`check_request_claims`; step 12's key binding is in
:mod:`token`.
"""

from __future__ import annotations

import functools
import hmac
import math
from typing import Any, NamedTuple

from dpop_middleware.core.jose import COMPACT_JWS, MalformedError, b64decode, b64encode, json_object
from dpop_middleware.core.keys import (
    LRU,
    PRIVATE_MEMBERS,
    ProofKey,
    UnusableKeyError,
    import_proof_key,
)
from dpop_middleware.errors import InvalidDPoPProofError

_TYPES = frozenset({"dpop+jwt", "application/dpop+jwt"})


class Proof(NamedTuple):
    """A proof whose header, signature and claim types have been checked.

    A NamedTuple (immutable, and built in a third of the time of a frozen dataclass: one is
    built per request).
    """

    key: ProofKey
    jti: str
    htm: str
    htu: str
    iat: float
    ath: str | None
    nonce: str | None
    claims: dict[str, Any]


def _bad(reason: str, description: str) -> InvalidDPoPProofError:
    return InvalidDPoPProofError(reason, description)


class ProofParser:
    """Parses and verifies proof JWTs; caches the checked header (alg + imported key) per header.

    The cache is keyed by the raw base64url header segment: the same bytes always decode to the
    same ``typ``, ``alg`` and ``jwk``, so a hit skips base64, JSON, key import and thumbprint, and
    only a header that passed every check is ever stored.
    """

    def __init__(
        self, algorithms: tuple[str, ...], *, max_jti_length: int, cache_size: int
    ) -> None:
        self._algorithms = frozenset(algorithms)
        self._max_jti = max_jti_length
        self._headers: LRU[str, ProofKey] = LRU(cache_size)

    def _header(self, segment: str) -> ProofKey:
        cached = self._headers.get(segment)
        if cached is not None:
            return cached
        try:
            header = json_object(segment)
        except MalformedError:
            raise _bad("proof_malformed", "DPoP proof is not a well-formed JWT") from None
        # Step 4: typ (RFC 9449 section 11.5: guards against swapping another JWT in).
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in _TYPES:
            raise _bad("typ_invalid", "DPoP proof typ must be dpop+jwt")
        # Step 5: alg asymmetric, supported, allowed by local policy; never none or MAC.
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise _bad("alg_not_allowed", "DPoP proof alg is not allowed")
        if "crit" in header:
            # RFC 7515 section 4.1.11: we understand no extensions, so we must refuse them.
            raise _bad("crit_unsupported", "DPoP proof uses unsupported critical headers")
        jwk = header.get("jwk")
        if not isinstance(jwk, dict):
            raise _bad("jwk_missing", "DPoP proof has no jwk header")
        # Step 7: jwk holds no private key (RFC 9449 section 4.2).
        if PRIVATE_MEMBERS & jwk.keys():
            raise _bad("jwk_private", "DPoP proof jwk contains private key material")
        try:
            key = import_proof_key(jwk, alg)
        except UnusableKeyError:
            raise _bad("jwk_invalid", "DPoP proof jwk is not a usable key for its alg") from None
        self._headers.put(segment, key)
        return key

    def parse(self, value: str) -> Proof:
        # Step 2: a single well-formed JWT (size was bounded before we got here).
        if COMPACT_JWS.fullmatch(value) is None:
            raise _bad("proof_malformed", "DPoP proof is not a well-formed JWT")
        header_seg, payload_seg, sig_seg = value.split(".")
        key = self._header(header_seg)
        # Step 6: the signature verifies with the jwk header.
        try:
            signature = b64decode(sig_seg)
        except MalformedError:
            raise _bad("proof_malformed", "DPoP proof is not a well-formed JWT") from None
        if not key.verify(f"{header_seg}.{payload_seg}".encode("ascii"), signature):
            raise _bad("signature_invalid", "DPoP proof signature is invalid")
        try:
            claims = json_object(payload_seg)
        except MalformedError:
            raise _bad("proof_malformed", "DPoP proof is not a well-formed JWT") from None
        # Step 3: required claims (section 4.2), of the right types.
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise _bad("jti_missing", "DPoP proof has no jti")
        if len(jti) > self._max_jti:
            raise _bad("jti_too_long", "DPoP proof jti is too long")  # section 11.1
        htm = claims.get("htm")
        if not isinstance(htm, str):
            raise _bad("htm_missing", "DPoP proof has no htm")
        htu = claims.get("htu")
        if not isinstance(htu, str):
            raise _bad("htu_missing", "DPoP proof has no htu")
        iat = claims.get("iat")
        if isinstance(iat, bool) or not isinstance(iat, int | float) or not math.isfinite(iat):
            raise _bad("iat_missing", "DPoP proof has no numeric iat")
        ath = claims.get("ath")
        if ath is not None and not isinstance(ath, str):
            raise _bad("ath_invalid", "DPoP proof ath is not a string")
        nonce = claims.get("nonce")
        if nonce is not None and not isinstance(nonce, str):
            raise _bad("nonce_invalid_type", "DPoP proof nonce is not a string")
        return Proof(key, jti, htm, htu, float(iat), ath, nonce, claims)


@functools.lru_cache(maxsize=4096)
def _ath(token_digest: bytes) -> bytes:
    # A pure function of the digest, and a client sends one token many times: memoised.
    return b64encode(token_digest).encode("ascii")


def check_ath(proof: Proof, token_digest: bytes) -> None:
    """Step 12 (first half) and section 7: ``ath`` = base64url(SHA-256(access token))."""
    if proof.ath is None:
        raise _bad("ath_missing", "DPoP proof has no ath claim (required with an access token)")
    # compare_digest refuses non-ASCII str (TypeError): compare bytes, so any claim value is safe.
    claimed = proof.ath.encode("utf-8", "surrogatepass")
    if not hmac.compare_digest(claimed, _ath(token_digest)):
        raise _bad("ath_mismatch", "DPoP proof ath does not match the access token")


def check_htm(proof: Proof, method: str) -> None:
    """Step 8: ``htm`` matches the request method (methods are case-sensitive, RFC 9110 9.1)."""
    if proof.htm != method:
        raise _bad("htm_mismatch", "DPoP proof htm does not match the request method")


def check_iat(proof: Proof, now: float, *, max_age: float, skew: float) -> None:
    """Step 11 by ``iat``: inside ``[now - max_age, now + skew]`` (section 11.1)."""
    if proof.iat < now - max_age:
        raise _bad("iat_too_old", "DPoP proof is too old")
    if proof.iat > now + skew:
        raise _bad("iat_in_future", "DPoP proof iat is in the future")
