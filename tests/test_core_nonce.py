"""Server-provided nonces (RFC 9449 sections 8, 9, 11.1-11.3), through the core."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import API, FrozenClock
from core_helpers import Answer, Harness

from dpop_middleware.core.nonce import NonceIssuer
from dpop_middleware.settings import Settings
from dpop_middleware.testing import DPoPKey, TokenIssuer

URL = API + "/items"
SECRET = "s" * 32
OTHER_SECRET = "o" * 32


@pytest.fixture
def nonce_settings(make_settings: Any) -> Any:
    def make(**nonce: Any) -> dict[str, Any]:
        return make_settings(nonce={"secret": SECRET, "lifetime": 60, **nonce})

    return make


@pytest.fixture
def token(issuer: TokenIssuer, dpop_key: DPoPKey) -> str:
    return issuer.token(bound_to=dpop_key, lifetime=3600)


def expect_nonce_challenge(answer: Answer, reason: str) -> str:
    assert (answer.status, answer.error, answer.reason) == (401, "use_dpop_nonce", reason)
    params = answer.challenge_params()
    assert params["error"] == "use_dpop_nonce"
    nonces = answer.header("dpop-nonce")
    assert len(nonces) == 1  # section 8: not more than one DPoP-Nonce header
    assert all(0x21 <= ord(c) <= 0x7E and c not in '"\\' for c in nonces[0])  # NQCHAR
    return nonces[0]


def test_round_trip(nonce_settings: Any, dpop_key: DPoPKey, token: str) -> None:
    h = Harness(nonce_settings())
    nonce = expect_nonce_challenge(h.dpop(dpop_key, token, "GET", URL), "nonce_missing")
    assert h.dpop(dpop_key, token, "GET", URL).challenge_params()["error_description"] == (
        "Resource server requires nonce in DPoP proof"  # figure 24
    )
    answer = h.dpop(dpop_key, token, "GET", URL, nonce=nonce)
    assert answer.status == 200
    assert answer.header("dpop-nonce") == []  # the client's nonce is current: nothing to rotate


def test_success_rotates_the_nonce_when_the_step_advances(
    nonce_settings: Any, dpop_key: DPoPKey, token: str, clock: FrozenClock
) -> None:
    h = Harness(nonce_settings())
    nonce = expect_nonce_challenge(h.dpop(dpop_key, token, "GET", URL), "nonce_missing")
    clock.advance(60)
    answer = h.dpop(dpop_key, token, "GET", URL, nonce=nonce)
    assert answer.status == 200  # the previous step is still accepted
    (fresh,) = answer.header("dpop-nonce")
    assert fresh != nonce
    assert answer.header("cache-control") == ["no-store"]  # section 8.2
    assert h.dpop(dpop_key, token, "GET", URL, nonce=fresh).header("dpop-nonce") == []


def test_expired_nonce(
    nonce_settings: Any, dpop_key: DPoPKey, token: str, clock: FrozenClock
) -> None:
    h = Harness(nonce_settings())
    nonce = expect_nonce_challenge(h.dpop(dpop_key, token, "GET", URL), "nonce_missing")
    clock.advance(120)  # two steps on: outside accepted_steps=2
    fresh = expect_nonce_challenge(
        h.dpop(dpop_key, token, "GET", URL, nonce=nonce), "nonce_invalid"
    )
    assert fresh != nonce
    assert h.dpop(dpop_key, token, "GET", URL, nonce=fresh).status == 200


def _swap(nonce: str, i: int) -> str:
    return nonce[:i] + ("B" if nonce[i] != "B" else "C") + nonce[i + 1 :]


def _issued(secret: str, context: str, now: float) -> str:
    raw = Settings.from_dict(
        {"token_verifier": lambda t: {}, "audience": context, "nonce": {"secret": secret}}
    )
    assert raw.nonce is not None
    return NonceIssuer(raw.nonce).current(now)


@pytest.mark.parametrize(
    "make_bad",
    [
        pytest.param(lambda now: _issued(OTHER_SECRET, API, now), id="another-secret"),
        pytest.param(
            lambda now: _issued(SECRET, "https://other-api.example", now), id="another-server"
        ),
        pytest.param(lambda now: _issued(SECRET, API, now)[:-1], id="truncated"),
        pytest.param(lambda now: _swap(_issued(SECRET, API, now), 31), id="altered-mac"),
        pytest.param(lambda now: _swap(_issued(SECRET, API, now), 9), id="altered-step"),
        pytest.param(lambda now: _issued(SECRET, API, now + 60), id="from-the-future"),
        pytest.param(lambda now: "eyJ7S_zG.eyJH0-Z.HX4w-7v", id="rfc-example"),
        pytest.param(lambda now: "", id="empty"),
    ],
)
def test_bad_nonces(
    nonce_settings: Any, dpop_key: DPoPKey, token: str, clock: FrozenClock, make_bad: Any
) -> None:
    h = Harness(nonce_settings())
    assert _issued(SECRET, API, clock.now)  # sanity: the good one is made the same way
    expect_nonce_challenge(
        h.dpop(dpop_key, token, "GET", URL, nonce=make_bad(clock.now)), "nonce_invalid"
    )


def test_good_nonce_made_the_same_way_passes(
    nonce_settings: Any, dpop_key: DPoPKey, token: str, clock: FrozenClock
) -> None:
    h = Harness(nonce_settings())
    assert h.dpop(dpop_key, token, "GET", URL, nonce=_issued(SECRET, API, clock.now)).status == 200


def test_instances_with_the_same_secret_share_nonces(
    nonce_settings: Any, dpop_key: DPoPKey, token: str
) -> None:
    a, b = Harness(nonce_settings()), Harness(nonce_settings())
    nonce = expect_nonce_challenge(a.dpop(dpop_key, token, "GET", URL), "nonce_missing")
    assert b.dpop(dpop_key, token, "GET", URL, nonce=nonce).status == 200


def test_instances_with_different_secrets_do_not(
    nonce_settings: Any, dpop_key: DPoPKey, token: str
) -> None:
    a, b = Harness(nonce_settings()), Harness(nonce_settings(secret=OTHER_SECRET))
    nonce = expect_nonce_challenge(a.dpop(dpop_key, token, "GET", URL), "nonce_missing")
    expect_nonce_challenge(b.dpop(dpop_key, token, "GET", URL, nonce=nonce), "nonce_invalid")


def test_secret_rotation(nonce_settings: Any, dpop_key: DPoPKey, token: str) -> None:
    old = Harness(nonce_settings())
    nonce = expect_nonce_challenge(old.dpop(dpop_key, token, "GET", URL), "nonce_missing")
    rotated = Harness(nonce_settings(secret=[OTHER_SECRET, SECRET]))
    answer = rotated.dpop(dpop_key, token, "GET", URL, nonce=nonce)
    assert answer.status == 200
    (fresh,) = answer.header("dpop-nonce")  # issued under the new secret
    assert fresh != nonce
    retired = Harness(nonce_settings(secret=[OTHER_SECRET]))
    expect_nonce_challenge(retired.dpop(dpop_key, token, "GET", URL, nonce=nonce), "nonce_invalid")
    assert retired.dpop(dpop_key, token, "GET", URL, nonce=fresh).status == 200


@pytest.mark.parametrize(
    ("offset", "reason"),
    [
        pytest.param(-303, "iat_too_old", id="303s-past"),
        pytest.param(303, "iat_in_future", id="303s-future"),
        pytest.param(-3600, "iat_too_old", id="1h-past"),
    ],
)
def test_iat_window_holds_with_a_valid_nonce_by_default(
    make_settings: Any, dpop_key: DPoPKey, token: str, clock: FrozenClock, offset: int, reason: str
) -> None:
    """Default ``nonce.freshness="iat_and_nonce"``: a valid nonce does not excuse a bad ``iat``
    (SEP-1932 and FAPI 2.0 keep the window). 401 ``invalid_dpop_proof``, as without nonces: a new
    nonce would not fix the client's clock, so ``use_dpop_nonce`` would only cause a futile retry."""
    h = Harness(
        make_settings(
            proof_max_age=300, clock_skew=300, nonce={"secret": SECRET, "lifetime": 600}
        )
    )
    nonce = expect_nonce_challenge(h.dpop(dpop_key, token, "GET", URL), "nonce_missing")
    answer = h.dpop(dpop_key, token, "GET", URL, nonce=nonce, iat=clock.now + offset)
    assert (answer.status, answer.error, answer.reason) == (401, "invalid_dpop_proof", reason)
    assert answer.header("dpop-nonce") == []
    assert answer.challenge_params()["error"] == "invalid_dpop_proof"
    # Inside the window, the same nonce passes.
    assert h.dpop(dpop_key, token, "GET", URL, nonce=nonce, iat=clock.now - 299).status == 200


@pytest.mark.parametrize("offset", [-303, 303], ids=["303s-past", "303s-future"])
def test_bad_iat_without_nonce_is_refused_by_default(
    nonce_settings: Any, dpop_key: DPoPKey, token: str, clock: FrozenClock, offset: int
) -> None:
    """Nonce offered but not required, default freshness: a bad iat is a hard failure."""
    h = Harness(nonce_settings(required=False))
    answer = h.dpop(dpop_key, token, "GET", URL, iat=clock.now + offset)
    reason = "iat_too_old" if offset < 0 else "iat_in_future"
    assert (answer.status, answer.error, answer.reason) == (401, "invalid_dpop_proof", reason)


@pytest.mark.parametrize("offset", [-303, 303, -3600, 3600])
def test_valid_nonce_judges_freshness_in_nonce_only_mode(
    nonce_settings: Any, dpop_key: DPoPKey, token: str, clock: FrozenClock, offset: int
) -> None:
    """Opt-in ``nonce_only`` (section 11.1): with a server nonce, a client with a bad clock still
    gets in."""
    h = Harness(nonce_settings(freshness="nonce_only"))
    nonce = expect_nonce_challenge(h.dpop(dpop_key, token, "GET", URL), "nonce_missing")
    assert h.dpop(dpop_key, token, "GET", URL, nonce=nonce, iat=clock.now + offset).status == 200


@pytest.mark.parametrize("offset", [-3600, 3600], ids=["stale-iat", "future-iat"])
def test_bad_iat_without_nonce_gets_a_chance_in_nonce_only_mode(
    nonce_settings: Any, dpop_key: DPoPKey, token: str, clock: FrozenClock, offset: int
) -> None:
    h = Harness(nonce_settings(required=False, freshness="nonce_only"))
    answer = h.dpop(dpop_key, token, "GET", URL, iat=clock.now + offset)
    nonce = expect_nonce_challenge(answer, "iat_too_old" if offset < 0 else "iat_in_future")
    assert h.dpop(dpop_key, token, "GET", URL, nonce=nonce, iat=clock.now + offset).status == 200


def test_required_only_on_listed_prefixes(
    nonce_settings: Any, dpop_key: DPoPKey, token: str
) -> None:
    h = Harness(nonce_settings(required=["/pay"]))
    answer = h.dpop(dpop_key, token, "GET", URL)
    assert answer.status == 200
    assert len(answer.header("dpop-nonce")) == 1  # offered, so the client can use it next time
    expect_nonce_challenge(h.dpop(dpop_key, token, "GET", API + "/pay/now"), "nonce_missing")
    expect_nonce_challenge(h.dpop(dpop_key, token, "GET", API + "/pay"), "nonce_missing")
    assert h.dpop(dpop_key, token, "GET", API + "/payments").status == 200


def test_nonce_claim_is_required_once_provided(
    nonce_settings: Any, dpop_key: DPoPKey, token: str
) -> None:
    """Section 11.3: no proofs without the nonce claim when a nonce has been provided."""
    h = Harness(nonce_settings())
    expect_nonce_challenge(h.dpop(dpop_key, token, "GET", URL), "nonce_missing")
    expect_nonce_challenge(h.dpop(dpop_key, token, "GET", URL), "nonce_missing")


def test_replay_ttl_covers_nonce_lifetime(
    nonce_settings: Any, dpop_key: DPoPKey, token: str, clock: FrozenClock
) -> None:
    """Nonce-only: a proof is accepted as long as its nonce is; its jti must be remembered that
    long."""
    clock.now = clock.now // 60 * 60  # the start of a step: the nonce lives two whole steps
    h = Harness(nonce_settings(freshness="nonce_only"))
    nonce = expect_nonce_challenge(h.dpop(dpop_key, token, "GET", URL), "nonce_missing")
    proof = dpop_key.proof("GET", URL, access_token=token, nonce=nonce, iat=clock.now)
    headers = [("authorization", f"DPoP {token}"), ("dpop", proof)]
    assert h.send("GET", URL, headers).status == 200
    clock.advance(119)  # the nonce is still valid (previous step)
    answer = h.send("GET", URL, headers)
    assert (answer.status, answer.reason) == (401, "replayed")


def test_replay_ttl_is_the_iat_window_by_default(
    nonce_settings: Any, dpop_key: DPoPKey, token: str, clock: FrozenClock
) -> None:
    """With iat checked, a proof older than the window is refused anyway: the jti is kept for
    the iat window, not the nonce lifetime."""
    # At the start of a nonce step: 61 s later the nonce is still valid (2 steps of 60 s), so
    # the refusal is iat's (from second 59 of a step, it was the nonce's: 1 run in 60 failed).
    clock.now = float(int(clock.now) // 60 * 60)
    h = Harness(nonce_settings())
    assert h.settings.replay_ttl == 60 + 10 + 1
    nonce = expect_nonce_challenge(h.dpop(dpop_key, token, "GET", URL), "nonce_missing")
    proof = dpop_key.proof("GET", URL, access_token=token, nonce=nonce, iat=clock.now)
    headers = [("authorization", f"DPoP {token}"), ("dpop", proof)]
    assert h.send("GET", URL, headers).status == 200
    assert (h.send("GET", URL, headers).status, h.send("GET", URL, headers).reason) == (
        401,
        "replayed",
    )
    clock.advance(61)  # past the window: refused by iat, whatever the replay store remembers
    answer = h.send("GET", URL, headers)
    assert (answer.status, answer.error, answer.reason) == (401, "invalid_dpop_proof", "iat_too_old")


def test_nonce_is_unpredictable_per_secret_and_step(clock: FrozenClock) -> None:
    n1 = _issued(SECRET, API, clock.now)
    n2 = _issued(SECRET, API, clock.now + 60)
    n3 = _issued(OTHER_SECRET, API, clock.now)
    assert len({n1, n2, n3}) == 3
    assert n1[11:] != n2[11:]  # the MAC part differs, not only the step


def test_no_nonce_header_when_nonces_are_off(
    make_settings: Any, dpop_key: DPoPKey, token: str
) -> None:
    h = Harness(make_settings())
    answer = h.dpop(dpop_key, token, "GET", URL, nonce="anything")
    assert answer.status == 200
    assert answer.header("dpop-nonce") == []


def test_issuer_fixture_type(issuer: TokenIssuer) -> None:
    assert issuer.audience == API
