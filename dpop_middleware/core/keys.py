"""Keys: proof keys from the ``jwk`` header, and the issuer's JWK Set for access tokens.

joserfc imports and validates keys and computes RFC 7638 thumbprints. On the hot path we keep what
it gives us (the ``cryptography`` public key object and the thumbprint) in bounded LRU caches and
verify signatures with that object directly: importing a key costs about half a signature check,
and a client sends the same key on every request.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, JWKRegistry, OctKey, OKPKey, RSAKey

from dpop_middleware.core.jose import MalformedError, b64decode
from dpop_middleware.errors import ConfigurationError

K = TypeVar("K")
V = TypeVar("V")

#: RFC 7517/7518 members that only a private (or symmetric) key has (RFC 9449 section 4.2).
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
MIN_RSA_BITS = 2048
#: A larger modulus costs milliseconds per signature check and no client needs one.
MAX_RSA_BITS = 8192
#: RFC 8017 section 3.1 allows any odd exponent below ``n``; clients use 65537.
MAX_RSA_EXPONENT = 2**32
#: The longest wait between two attempts to fetch a JWK Set after failures in a row.
MAX_RETRY_DELAY = 30.0
#: The longest wait between two fetches asked for by unknown ``kid`` values.
MAX_UNKNOWN_KID_DELAY = 60.0

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512,
}  # fmt: skip
_EC_CURVES = {"ES256": ("P-256", 32), "ES384": ("P-384", 48), "ES512": ("P-521", 66)}


class UnusableKeyError(ValueError):
    """A ``jwk`` that cannot be used with the ``alg`` (wrong type, curve, size, or malformed)."""


class LRU(Generic[K, V]):
    """A small LRU map bounded by entries and, optionally, by bytes (each ``put`` says what its
    entry costs). Not thread-safe by itself; races only cost a recomputation (or, for the byte
    count, a drift of one entry's cost, corrected as entries leave)."""

    __slots__ = ("_bytes", "_costs", "_data", "_max_bytes", "_size")

    def __init__(self, size: int, *, max_bytes: int | None = None) -> None:
        self._size = size
        self._max_bytes = max_bytes
        self._bytes = 0
        self._data: OrderedDict[K, V] = OrderedDict()
        self._costs: dict[K, int] = {}

    def get(self, key: K) -> V | None:
        data = self._data
        value = data.get(key)
        if value is not None:
            # A plain try costs nothing here; contextlib.suppress costs about a microsecond.
            try:  # noqa: SIM105
                data.move_to_end(key)
            except KeyError:  # removed by another thread in between
                pass
        return value

    def put(self, key: K, value: V, cost: int = 0) -> None:
        if self._size <= 0 or (self._max_bytes is not None and cost > self._max_bytes):
            return
        data = self._data
        costs = self._costs
        self._bytes += cost - costs.get(key, 0)
        costs[key] = cost
        data[key] = value
        data.move_to_end(key)
        max_bytes = self._max_bytes
        while len(data) > self._size or (max_bytes is not None and self._bytes > max_bytes):
            try:
                old, _ = data.popitem(last=False)
            except KeyError:
                break
            self._bytes -= costs.pop(old, 0)

    @property
    def bytes(self) -> int:
        """The summed cost of the entries held."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._data)


Verify = Callable[[bytes, bytes], bool]


def _ec_verifier(key: ec.EllipticCurvePublicKey, size: int, alg: str) -> Verify:
    algorithm = ec.ECDSA(_HASHES[alg[2:]]())

    def verify(data: bytes, sig: bytes) -> bool:
        # JWS carries R || S of fixed size (RFC 7518 section 3.4); cryptography wants DER.
        if len(sig) != 2 * size:
            return False
        der = encode_dss_signature(
            int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big")
        )
        try:
            key.verify(der, data, algorithm)
        except InvalidSignature:
            return False
        return True

    return verify


def _rsa_verifier(key: rsa.RSAPublicKey, alg: str) -> Verify:
    hash_cls = _HASHES[alg[2:]]
    pad: padding.AsymmetricPadding
    if alg.startswith("PS"):
        # RFC 7518 section 3.5: MGF1 with the same hash, salt as long as the hash output.
        pad = padding.PSS(mgf=padding.MGF1(hash_cls()), salt_length=hash_cls().digest_size)
    else:
        pad = padding.PKCS1v15()

    def verify(data: bytes, sig: bytes) -> bool:
        try:
            key.verify(sig, data, pad, hash_cls())
        except InvalidSignature:
            return False
        return True

    return verify


def _okp_verifier(key: ed25519.Ed25519PublicKey | ed448.Ed448PublicKey) -> Verify:
    def verify(data: bytes, sig: bytes) -> bool:
        try:
            key.verify(sig, data)
        except InvalidSignature:
            return False
        return True

    return verify


def check_rsa_bounds(jwk: Mapping[str, Any]) -> None:
    """UnusableKeyError unless the RSA ``jwk``'s ``n`` has 2048 to 8192 bits and its ``e`` is odd,
    from 3 to 2**32: checked on the JWK members, before any import or signature work.

    Anyone can put a key in a proof header: a 16,384-bit ``n``, or a ``e`` as long as ``n``, costs
    milliseconds of CPU for each refusal. ``n`` and ``e`` are strict base64url (RFC 7518 section
    6.3.1); the bits are those of the value, so leading zero octets do not count.
    """
    n, e = jwk.get("n"), jwk.get("e")
    if not isinstance(n, str) or not isinstance(e, str):
        raise UnusableKeyError("RSA n and e must be strings")
    try:
        modulus = int.from_bytes(b64decode(n), "big")
        exponent = int.from_bytes(b64decode(e), "big")
    except MalformedError as exc:
        raise UnusableKeyError("RSA n or e is not base64url") from exc
    bits = modulus.bit_length()
    if bits < MIN_RSA_BITS:
        raise UnusableKeyError(f"RSA keys must have at least {MIN_RSA_BITS} bits")
    if bits > MAX_RSA_BITS:
        raise UnusableKeyError(f"RSA keys must have at most {MAX_RSA_BITS} bits")
    if exponent < 3 or exponent > MAX_RSA_EXPONENT or not exponent & 1:
        raise UnusableKeyError("RSA e must be odd, from 3 to 2**32")


@dataclass(frozen=True, slots=True)
class ProofKey:
    """A public key from a proof header, ready to verify, with its RFC 7638 thumbprint."""

    alg: str
    jkt: str
    verify: Verify
    #: ``jkt`` as ASCII bytes, for the binding check and the replay key.
    jkt_bytes: bytes = b""

    def __post_init__(self) -> None:
        object.__setattr__(self, "jkt_bytes", self.jkt.encode("ascii"))


def import_proof_key(jwk: Mapping[str, Any], alg: str) -> ProofKey:
    """Import a public ``jwk`` for ``alg``; UnusableKeyError if it does not fit (RFC 9449 section 4.3).

    The caller has already refused private members.
    """
    kty = jwk.get("kty")
    jwk_alg = jwk.get("alg")
    if jwk_alg is not None and jwk_alg != alg:
        raise UnusableKeyError("jwk alg differs from the header alg")
    try:
        if alg in _EC_CURVES:
            curve, size = _EC_CURVES[alg]
            if kty != "EC" or jwk.get("crv") != curve:
                raise UnusableKeyError(f"{alg} needs an EC {curve} key")
            ec_key = ECKey.import_key(dict(jwk))
            pub = ec_key.public_key
            assert isinstance(pub, ec.EllipticCurvePublicKey)
            return ProofKey(alg, ec_key.thumbprint(), _ec_verifier(pub, size, alg))
        if alg[:2] in ("RS", "PS"):
            if kty != "RSA":
                raise UnusableKeyError(f"{alg} needs an RSA key")
            check_rsa_bounds(jwk)
            rsa_key = RSAKey.import_key(dict(jwk))
            pub_rsa = rsa_key.public_key
            assert isinstance(pub_rsa, rsa.RSAPublicKey)
            return ProofKey(alg, rsa_key.thumbprint(), _rsa_verifier(pub_rsa, alg))
        if alg in ("EdDSA", "Ed25519"):
            curves = ("Ed25519", "Ed448") if alg == "EdDSA" else ("Ed25519",)
            if kty != "OKP" or jwk.get("crv") not in curves:
                raise UnusableKeyError(f"{alg} needs an OKP {' or '.join(curves)} key")
            okp_key = OKPKey.import_key(dict(jwk))
            pub_okp = okp_key.public_key
            assert isinstance(pub_okp, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
            return ProofKey(alg, okp_key.thumbprint(), _okp_verifier(pub_okp))
    except (JoseError, ValueError, TypeError) as exc:
        if isinstance(exc, UnusableKeyError):
            raise
        raise UnusableKeyError("malformed jwk") from exc
    raise UnusableKeyError(f"unsupported alg {alg}")


@dataclass(frozen=True, slots=True)
class SkippedKey:
    """A key of a JWK Set that was not loaded: its ``kid`` (if any) and why. Never key material."""

    kid: str | None
    reason: str


class IssuerKeys:
    """The authorization server's JWK Set, from ``jwks`` or fetched from ``jwks_uri``.

    The core does no I/O: it says when a fetch is due (:meth:`fetch_due`), and the adapter fetches
    (in a thread, or with an async client) and hands the document back (:meth:`load` /
    :meth:`fetch_failed`). The set is refetched every ``cache_ttl``, and when a token names an
    unknown ``kid`` (rate-limited by :meth:`unknown_kid_delay`, so a flood of bogus ``kid`` values
    cannot hammer the authorization server).

    A failed fetch, or a fetched set with no usable key, keeps the last good set; the next
    attempt waits ``min(refresh_interval, 5 s)``, doubling with each failure in a row up to
    :data:`MAX_RETRY_DELAY`.
    """

    def __init__(
        self,
        jwks: Mapping[str, Any] | None,
        *,
        uri: str | None,
        cache_ttl: float,
        refresh_interval: float,
        max_stale: float = math.inf,
    ) -> None:
        self.uri = uri
        self.cache_ttl = cache_ttl
        self.refresh_interval = refresh_interval
        #: How long past ``cache_ttl`` a set that could not be refreshed is still used.
        self.max_stale = max_stale
        #: The usable public signing keys; None until a JWK Set was loaded.
        self.key_set: tuple[ECKey | RSAKey | OKPKey | OctKey, ...] | None = None
        self.loaded_at = float("-inf")
        #: ``loaded_at + cache_ttl``: before it the set is not due for a refresh (a fetched set).
        self.fresh_until = float("-inf")
        self.attempted_at = float("-inf")
        #: Failed fetches in a row (a document that is not a usable JWK Set counts as one).
        self.failures = 0
        #: Bumped whenever the loaded keys change; cached tokens carry the version they passed.
        self.version = 0
        self._fingerprint: tuple[str, ...] = ()
        #: Fetches in a row, asked for by an unknown ``kid``, that brought no change.
        self.fruitless = 0
        self._for_unknown_kid = False
        #: What the last :meth:`load` skipped (the caller logs it).
        self.skipped: tuple[SkippedKey, ...] = ()
        if jwks is not None:
            try:
                self.load(jwks, now=0.0)
            except ValueError as exc:
                skipped: tuple[SkippedKey, ...] = self.skipped
                why = "; ".join(f"kid {each.kid!r}: {each.reason}" for each in skipped)
                raise ConfigurationError(
                    f"dpop_middleware setting 'jwks': {exc}" + (f" ({why})" if why else "")
                ) from exc
            self.uri = None
            self.fresh_until = math.inf  # a fixed set is never refetched

    def load(self, jwks: Mapping[str, Any], *, now: float) -> tuple[SkippedKey, ...]:
        """Install a JWK Set document; return the keys it skipped (for the caller to log).

        RFC 7517 section 5: keys of a type we do not understand, missing required members or with
        values out of range are ignored, not fatal to the set; so are encryption keys. A key with
        private members is skipped too (a public JWK Set never has them) and reported.
        ValueError if the document is not a JWK Set or holds no usable key: the caller then
        reports a failed fetch, and the last good set stays.
        """
        self.skipped = ()
        keys = jwks.get("keys") if isinstance(jwks, Mapping) else None
        if not isinstance(keys, list):
            raise ValueError("not a JWK Set")
        usable: list[ECKey | RSAKey | OKPKey | OctKey] = []
        skipped: list[SkippedKey] = []
        for entry in keys:
            if not isinstance(entry, Mapping):
                skipped.append(SkippedKey(None, "not a JSON object"))
                continue
            if entry.get("kty") not in ("EC", "RSA", "OKP") or entry.get("use", "sig") != "sig":
                continue  # not for us (RFC 7517 section 5): ignored silently
            kid = entry.get("kid")
            kid = kid[:100] if isinstance(kid, str) else None
            if PRIVATE_MEMBERS & set(entry):
                skipped.append(SkippedKey(kid, "has private key members"))
                continue
            try:
                key = JWKRegistry.import_key(dict(entry))
                key.ensure_kid()
            except JoseError as exc:
                # joserfc's descriptions name the member ("'crv' is required"), never its value.
                skipped.append(SkippedKey(kid, f"malformed: {str(exc.description)[:100]}"))
                continue
            except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:
                skipped.append(SkippedKey(kid, f"malformed: {type(exc).__name__}"))
                continue
            assert isinstance(key, ECKey | RSAKey | OKPKey | OctKey)
            usable.append(key)
        self.skipped = tuple(skipped)
        if not usable:
            raise ValueError("the JWK Set holds no usable signing key")
        fingerprint = tuple(
            sorted(json.dumps(key.as_dict(private=False), sort_keys=True) for key in usable)
        )
        # The keys first, the version after: a request that reads the version and then the keys
        # (AccessTokenChecker.check) can tag its cache entry with an older version than the
        # keys it used (a harmless miss later), never with a newer one.
        self.key_set = tuple(usable)
        if fingerprint != self._fingerprint:  # the same set again keeps cached tokens valid
            self._fingerprint = fingerprint
            self.version += 1
            self.fruitless = 0
        elif self._for_unknown_kid:
            self.fruitless += 1
        self._for_unknown_kid = False
        self.loaded_at = now
        self.fresh_until = now + self.cache_ttl
        self.attempted_at = now
        self.failures = 0
        return self.skipped

    def too_stale(self, now: float) -> bool:
        """A fetched set that could not be refreshed for ``cache_ttl + max_stale`` seconds: its
        keys are no longer trusted (the issuer may have removed one meanwhile)."""
        return self.uri is not None and now - self.loaded_at >= self.cache_ttl + self.max_stale

    def fetch_failed(self, *, now: float) -> None:
        self.attempted_at = now
        self.failures += 1
        self._for_unknown_kid = False

    @property
    def retry_delay(self) -> float:
        """Seconds from the last attempt before the next one, after failures in a row."""
        base = min(self.refresh_interval, 5.0)
        if self.failures <= 1:
            return base
        return min(base * 2.0 ** min(self.failures - 1, 30), max(MAX_RETRY_DELAY, base))

    def fetch_due(self, kid: str | None, *, now: float) -> bool:
        """Whether the adapter should fetch ``jwks_uri`` before this token can be checked."""
        if self.uri is None:
            return False
        since = now - self.attempted_at
        if self.failures and since < self.retry_delay:
            return False  # back off after failed fetches
        if self.key_set is None or now - self.loaded_at >= self.cache_ttl:
            return True
        if kid is None or self.find(kid) is not None or since < self.unknown_kid_delay(since):
            return False
        self._for_unknown_kid = True
        return True

    def unknown_kid_delay(self, since: float) -> float:
        """Seconds from the last fetch before an unknown ``kid`` may cause another.

        ``refresh_interval``, doubled for each such fetch in a row that brought no new key, up
        to :data:`MAX_UNKNOWN_KID_DELAY`; a quiet spell of twice that starts over. A flood of
        bogus ``kid`` values costs 5 fetches in its first 90 s and then one a minute (with the
        5 s default), while a real new key is fetched at its first use, or within
        ``refresh_interval`` of the last fetch.
        """
        base = self.refresh_interval
        cap = max(MAX_UNKNOWN_KID_DELAY, base)
        if not self.fruitless or since >= 2 * cap:
            return base
        return min(base * 2.0 ** min(self.fruitless - 1, 30), cap)

    def find(self, kid: str) -> ECKey | RSAKey | OKPKey | OctKey | None:
        """The loaded key with this ``kid``, or None."""
        for key in self.key_set or ():
            if key.kid == kid:
                return key
        return None


class JWKSFetchNeeded(Exception):
    """Raised by the core when the adapter must fetch ``uri`` and call :meth:`IssuerKeys.load`."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.uri = uri
