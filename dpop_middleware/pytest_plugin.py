"""pytest fixtures from the test kit, registered through the ``pytest11`` entry point.

Installing dpop-middleware gives every test suite two fixtures (a ``conftest.py`` fixture of the
same name takes precedence; ``-p no:dpop_middleware`` turns the plugin off):

* ``dpop_key``: a fresh ES256 :class:`~dpop_middleware.testing.DPoPKey` for each test;
* ``dpop_issuer``: a fresh :class:`~dpop_middleware.testing.TokenIssuer` for each test
  (``iss`` ``https://issuer.example``, ``aud`` ``https://api.example``); its ``settings()`` is a
  middleware settings dict that trusts it.

The test kit is imported when a fixture is first used, so the plugin costs nothing otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from dpop_middleware.testing import DPoPKey, TokenIssuer


@pytest.fixture
def dpop_key() -> DPoPKey:
    """A fresh ES256 client key: ``dpop_key.proof(method, url, access_token=...)``."""
    from dpop_middleware.testing import DPoPKey

    return DPoPKey.generate()


@pytest.fixture
def dpop_issuer() -> TokenIssuer:
    """A local token issuer: ``dpop_issuer.token(bound_to=key)``, ``dpop_issuer.settings()``."""
    from dpop_middleware.testing import TokenIssuer

    return TokenIssuer()
