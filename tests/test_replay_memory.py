"""The memory store's cap: sized from the replay TTL so that one process cannot fill it.

Without an explicit ``max_entries`` the cap is ``max(1_000_000, ceil(replay_ttl * 20_000))``:
room for every proof a process accepting 20,000 a second (more than one Python process can
verify) records within one replay window. An explicit ``max_entries`` wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from dpop_middleware import DPoPMiddleware, DPoPWSGIMiddleware
from dpop_middleware.replay import create_async_store, create_sync_store
from dpop_middleware.replay.memory import (
    DEFAULT_MAX_ENTRIES,
    MAX_PROOFS_PER_SECOND,
    AsyncMemoryReplayStore,
    MemoryReplayStore,
    default_max_entries,
)
from dpop_middleware.settings import Settings

SECRET = "s" * 32


def caps(settings: dict[str, Any]) -> tuple[int, int]:
    """The cap of the store each adapter builds from these settings (ASGI, WSGI)."""
    asgi = DPoPMiddleware(lambda *a: None, settings)  # type: ignore[arg-type, return-value]
    wsgi = DPoPWSGIMiddleware(lambda *a: [], settings)
    assert isinstance(asgi.store, AsyncMemoryReplayStore)
    assert isinstance(wsgi.store, MemoryReplayStore)
    return asgi.store.sync.max_entries, wsgi.store.max_entries


@pytest.mark.parametrize(
    ("extra", "ttl", "cap"),
    [
        pytest.param({}, 71, 1_420_000, id="defaults"),
        pytest.param({"proof_max_age": 1, "clock_skew": 0}, 2, 1_000_000, id="short-window"),
        pytest.param({"nonce": {"secret": SECRET}}, 71, 1_420_000, id="nonce-defaults"),
        pytest.param(
            {"nonce": {"secret": SECRET, "freshness": "nonce_only"}},
            181,
            3_620_000,
            id="nonce-only-defaults",
        ),
        pytest.param(
            {"nonce": {"secret": SECRET, "lifetime": 300, "freshness": "nonce_only"}},
            901,
            18_020_000,
            id="nonce-only-300s",
        ),
        pytest.param(
            {
                "nonce": {
                    "secret": SECRET,
                    "lifetime": 3600,
                    "accepted_steps": 10,
                    "freshness": "nonce_only",
                }
            },
            39_601,
            792_020_000,
            id="longest-window",
        ),
    ],
)
def test_the_default_cap_holds_every_proof_of_a_full_speed_replay_window(
    make_settings: Callable[..., dict[str, Any]], extra: dict[str, Any], ttl: float, cap: int
) -> None:
    settings = make_settings(**extra)
    assert Settings.from_dict(settings).replay_ttl == ttl
    assert caps(settings) == (cap, cap)
    assert cap >= ttl * MAX_PROOFS_PER_SECOND
    assert cap == default_max_entries(ttl) == max(DEFAULT_MAX_ENTRIES, math.ceil(ttl * 20_000))


@pytest.mark.parametrize(
    "store",
    [
        pytest.param({"url": "memory://", "max_entries": 5}, id="dict"),
        pytest.param("memory://?max_entries=5", id="url"),
    ],
)
def test_an_explicit_max_entries_wins(
    make_settings: Callable[..., dict[str, Any]], store: Any
) -> None:
    nonce = {"secret": SECRET, "lifetime": 300}
    assert caps(make_settings(replay_store=store, nonce=nonce)) == (5, 5)


def test_the_factories_without_a_ttl_keep_the_fixed_default() -> None:
    config = Settings.from_dict({"token_verifier": dict}).replay_store
    sync = create_sync_store(config)
    async_ = create_async_store(config)
    assert isinstance(sync, MemoryReplayStore) and isinstance(async_, AsyncMemoryReplayStore)
    assert (sync.max_entries, async_.sync.max_entries) == (DEFAULT_MAX_ENTRIES,) * 2
    assert create_sync_store(config, replay_ttl=901).max_entries == 18_020_000  # type: ignore[attr-defined]
