"""DPoP proof checks (RFC 9449 section 4.3).

The section lists twelve checks "performed in any order". Here the syntax of all three segments
comes first, then the header (cached per distinct header), then the signature, then the claims,
so that a claim is only ever judged on a proof whose signature is good and the log line names
the real defect.

Step 1 (one ``DPoP`` header) is in :mod:`headers`; steps 8 to 11 need the request and the nonce
state: the verifier runs them, with :func:`check_ath` and :func:`check_iat` from here and
:mod:`htu`; step 12's key binding is in :mod:`token`.
"""

from __future__ import annotations

import functools
import hmac
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from dpop_middleware.core.frozen import FrozenDict, freeze
from dpop_middleware.core.jose import MalformedError, b64decode, json_object, json_object_from
from dpop_middleware.core.keys import (
    PRIVATE_MEMBERS,
    ProofKey,
    UnusableKeyError,
    import_proof_key,
)
from dpop_middleware.errors import InvalidDPoPProofError

_TYPES = frozenset({"dpop+jwt", "application/dpop+jwt"})
_MAX_CACHED_HEADER = 2048


class Proof(NamedTuple):
    """A proof whose header, signature and claim types have been checked.

    A NamedTuple (immutable, and built in a third of the time of a frozen dataclass: one is
    built per request).
    """

    key: ProofKey
    jti: str
    htm: str
    htu: str
    iat: int | float
    ath: str | None
    nonce: str | None
    #: Deeply immutable (:func:`frozen.freeze`): the application gets this very object.
    claims: Mapping[str, Any]


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
        # functools.lru_cache: a C LRU, a third of the cost of ours on a hit. A refused header
        # raises, and exceptions are never cached.
        self._header: Callable[[str], ProofKey] = functools.lru_cache(maxsize=cache_size)(
            self._check_header
        )

    def _check_header(self, segment: str) -> ProofKey:
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
            return import_proof_key(jwk, alg)
        except UnusableKeyError as exc:
            # The cause (our own fixed words, never the key) goes to the operator's log line.
            raise InvalidDPoPProofError(
                "jwk_invalid",
                "DPoP proof jwk is not a usable key for its alg",
                log_detail={"jwk": str(exc)},
            ) from None

    def parse(self, value: str) -> Proof:
        # Step 2: a single well-formed JWT (size was bounded before we got here): three
        # segments, each strict base64url (jose.b64decode; a cached header segment is a string
        # that passed it before).
        parts = value.split(".")
        if len(parts) != 3:
            raise _bad("proof_malformed", "DPoP proof is not a well-formed JWT")
        header_seg, payload_seg, sig_seg = parts
        try:
            payload = b64decode(payload_seg)
            signature = b64decode(sig_seg)
        except MalformedError:
            raise _bad("proof_malformed", "DPoP proof is not a well-formed JWT") from None
        # Headers of ordinary keys are a few hundred characters; longer ones (an RSA key near the
        # size limit) are checked each time, so the cache holds at most
        # cache_size * _MAX_CACHED_HEADER characters however large the proofs an attacker signs.
        if len(header_seg) <= _MAX_CACHED_HEADER:
            key = self._header(header_seg)
        else:
            key = self._check_header(header_seg)
        # Step 6: the signature verifies with the jwk header.
        if not key.verify(f"{header_seg}.{payload_seg}".encode("ascii"), signature):
            raise _bad("signature_invalid", "DPoP proof signature is invalid")
        try:
            claims = json_object_from(payload)
        except MalformedError:
            raise _bad("proof_malformed", "DPoP proof is not a well-formed JWT") from None
        # Step 3: required claims (section 4.2), of the right types. JSON gives exact types, so
        # ``type(x) is str`` is isinstance without its cost (and keeps bool out of the numbers).
        get = claims.get
        jti, htm, htu, iat, ath, nonce = (
            get("jti"), get("htm"), get("htu"), get("iat"), get("ath"), get("nonce")
        )
        if type(jti) is not str or not jti:
            raise _bad("jti_missing", "DPoP proof has no jti")
        if len(jti) > self._max_jti:
            raise _bad("jti_too_long", "DPoP proof jti is too long")  # section 11.1
        if type(htm) is not str:
            raise _bad("htm_missing", "DPoP proof has no htm")
        if type(htu) is not str:
            raise _bad("htu_missing", "DPoP proof has no htu")
        if type(iat) is not int and (type(iat) is not float or not math.isfinite(iat)):
            raise _bad("iat_missing", "DPoP proof has no numeric iat")
        if ath is not None and type(ath) is not str:
            raise _bad("ath_invalid", "DPoP proof ath is not a string")
        if nonce is not None and type(nonce) is not str:
            raise _bad("nonce_invalid_type", "DPoP proof nonce is not a string")
        # Deeply immutable for the application. With one "{" and no "[" in the JSON text there
        # is no nested object or array (a string holding one only takes the longer way).
        if payload.count(b"{") == 1 and b"[" not in payload:
            frozen: Mapping[str, Any] = FrozenDict(claims)
        else:
            try:
                frozen = freeze(claims)
            except RecursionError:  # nested a little less deep than the JSON decoder's limit
                raise _bad("proof_malformed", "DPoP proof is not a well-formed JWT") from None
        return Proof(key, jti, htm, htu, iat, ath, nonce, frozen)


def check_ath(proof: Proof, expected: bytes) -> None:
    """Step 12 (first half) and section 7: ``ath`` = base64url(SHA-256(access token));
    ``expected`` is that value for the request's token (:func:`token.token_ath`)."""
    if proof.ath is None:
        raise _bad("ath_missing", "DPoP proof has no ath claim (required with an access token)")
    # compare_digest refuses non-ASCII str (TypeError): compare bytes, so any claim value is safe.
    if not hmac.compare_digest(proof.ath.encode("utf-8", "surrogatepass"), expected):
        raise _bad("ath_mismatch", "DPoP proof ath does not match the access token")


def check_iat(proof: Proof, now: float, max_age: float, skew: float) -> None:
    """Step 11 by ``iat``: inside ``[now - max_age, now + skew]`` (section 11.1)."""
    if proof.iat < now - max_age:
        raise _bad("iat_too_old", "DPoP proof is too old")
    if proof.iat > now + skew:
        raise _bad("iat_in_future", "DPoP proof iat is in the future")
