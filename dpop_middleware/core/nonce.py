"""Stateless server nonces (RFC 9449 sections 8, 9 and 11.1-11.3).

A nonce is ``base64url(step || HMAC-SHA256(secret, label || context || step)[:16])`` where
``step = floor(now / lifetime)``. It is unpredictable without the secret (section 8: "Nonce values
MUST be unpredictable"), made only of base64url characters (a subset of ``NQCHAR``), and checkable
by any instance holding the secret, with no shared store. ``context`` (by default the audience)
keeps one API's nonces from being accepted by another API that happens to share the secret
(section 9: nonces are accepted only by their issuer).

Secrets rotate: the first secret issues, every listed secret verifies.
"""

from __future__ import annotations

import hashlib
import hmac
import math

from dpop_middleware.core.jose import MalformedError, b64decode, b64encode
from dpop_middleware.settings import NonceSettings

_LABEL = b"dpop-middleware nonce v1\x00"
_MAC_BYTES = 16
_NONCE_LENGTH = 32  # base64url of 8 + 16 bytes


class NonceIssuer:
    def __init__(self, settings: NonceSettings) -> None:
        self._secrets = settings.secrets
        self._lifetime = settings.lifetime
        self._accepted = settings.accepted_steps
        self._context = settings.context.encode() + b"\x00"
        self._current: tuple[int, str] = (-1, "")

    def _mac(self, secret: bytes, step_bytes: bytes) -> bytes:
        digest = hmac.new(secret, _LABEL + self._context + step_bytes, hashlib.sha256).digest()
        return digest[:_MAC_BYTES]

    def step(self, now: float) -> int:
        return math.floor(now / self._lifetime)

    def current(self, now: float) -> str:
        """The nonce to hand out now (cached for the whole step)."""
        step = self.step(now)
        cached_step, cached = self._current
        if cached_step == step:
            return cached
        step_bytes = step.to_bytes(8, "big", signed=True)
        nonce = b64encode(step_bytes + self._mac(self._secrets[0], step_bytes))
        self._current = (step, nonce)
        return nonce

    def is_current(self, nonce: str, now: float) -> bool:
        return hmac.compare_digest(nonce, self.current(now))

    def valid(self, nonce: str, now: float) -> bool:
        """True if ``nonce`` was issued by us (any listed secret) within the accepted steps."""
        if len(nonce) != _NONCE_LENGTH:
            return False
        try:
            raw = b64decode(nonce)
        except MalformedError:
            return False
        if len(raw) != 8 + _MAC_BYTES or b64encode(raw) != nonce:
            return False
        step_bytes, mac = raw[:8], raw[8:]
        step = int.from_bytes(step_bytes, "big", signed=True)
        current = self.step(now)
        if not current - self._accepted < step <= current:
            return False
        ok = False
        for secret in self._secrets:
            # No early exit: the time taken does not say which secret matched.
            ok |= hmac.compare_digest(mac, self._mac(secret, step_bytes))
        return ok
