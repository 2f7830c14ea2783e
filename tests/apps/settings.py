"""Middleware settings for the test apps: the JSON file named by ``DPOP_TEST_SETTINGS``.

The file holds a plain settings dict (issuer, audience, the issuer's JWK Set, ``public_url``,
``replay_store``...), written by the test that starts the server.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def load() -> dict[str, Any]:
    path = os.environ.get("DPOP_TEST_SETTINGS")
    if not path:
        raise RuntimeError("set DPOP_TEST_SETTINGS to a JSON file with the middleware settings")
    settings: dict[str, Any] = json.loads(Path(path).read_text())
    return settings
