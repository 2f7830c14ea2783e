"""The pytest plugin: fixtures reach users through the pytest11 entry point."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from dpop_middleware import Settings
from dpop_middleware.testing import TokenIssuer

pytest_plugins = ["pytester"]

USER_TESTS = """
from dpop_middleware import Settings
from dpop_middleware.testing import DPoPKey, TokenIssuer


def test_fixtures(dpop_key, dpop_issuer):
    assert isinstance(dpop_key, DPoPKey) and dpop_key.alg == "ES256"
    assert isinstance(dpop_issuer, TokenIssuer)
    token = dpop_issuer.token(bound_to=dpop_key)
    assert token.count(".") == 2
    Settings.from_dict(dpop_issuer.settings())


SEEN = []


def test_fresh_key_per_test_1(dpop_key):
    SEEN.append(dpop_key.jkt)


def test_fresh_key_per_test_2(dpop_key):
    SEEN.append(dpop_key.jkt)
    assert SEEN[0] != SEEN[1]
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    # In-process run; hypothesis's plugin costs about a second to start and is not under test.
    return pytester.runpytest("-p", "no:hypothesispytest", *args)


def test_entry_point_is_registered() -> None:
    (plugin,) = [ep for ep in entry_points(group="pytest11") if ep.name == "dpop_middleware"]
    assert plugin.value == "dpop_middleware.pytest_plugin"


def test_installed_package_gives_users_the_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(USER_TESTS)
    result = run(pytester)
    result.assert_outcomes(passed=3)
    result = run(pytester, "--fixtures")
    result.stdout.fnmatch_lines(["*dpop_key*", "*fresh ES256 client key*", "*dpop_issuer*"])


def test_plugin_can_be_turned_off(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(USER_TESTS)
    result = run(pytester, "-p", "no:dpop_middleware", "-k", "test_fixtures")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'dpop_key' not found*"])


def test_dpop_issuer_fixture_here(dpop_issuer: TokenIssuer) -> None:
    # Our conftest.py overrides dpop_key, not dpop_issuer: this one comes from the plugin.
    assert (dpop_issuer.issuer, dpop_issuer.audience) == (
        "https://issuer.example",
        "https://api.example",
    )
    assert Settings.from_dict(dpop_issuer.settings()).audience == ("https://api.example",)
