"""Shared fixtures: a frozen, advanceable clock, a local token issuer and client keys."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from dpop_middleware.testing import DPoPKey, TokenIssuer

API = "https://api.example"


class FrozenClock:
    """An injectable clock: tests move time with ``advance``, never by sleeping."""

    def __init__(self, now: float | None = None) -> None:
        self.now = float(int(time.time()) if now is None else now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture(scope="session")
def session_issuer() -> TokenIssuer:
    return TokenIssuer(audience=API)


@pytest.fixture
def issuer(session_issuer: TokenIssuer, clock: FrozenClock) -> TokenIssuer:
    session_issuer.clock = clock
    return session_issuer


@pytest.fixture(scope="session")
def dpop_key() -> DPoPKey:
    return DPoPKey.generate("ES256")


@pytest.fixture(scope="session")
def other_key() -> DPoPKey:
    return DPoPKey.generate("ES256")


@pytest.fixture
def make_settings(issuer: TokenIssuer, clock: FrozenClock) -> Callable[..., dict[str, Any]]:
    def make(**extra: Any) -> dict[str, Any]:
        return issuer.settings(clock=clock, **extra)

    return make


from redis_fixtures import *  # noqa: E402, F403
