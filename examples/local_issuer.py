"""The examples' stand-in for an authorization server. For trying things out only.

It signs RFC 9068 access tokens with one ES256 key. The private key is kept in a JSON file so that
the server (every worker process) and a client (``python -m examples.client``) use the same one:
``$DPOP_EXAMPLE_ISSUER_KEY`` if set, else ``dpop-middleware-example-issuer.json`` in the system
temporary directory. The first process to need it creates it (mode 0600).

A real deployment drops this module and sets ``jwks_uri`` (or ``jwks``) to its authorization
server's keys, with that server's ``issuer`` and this API's ``audience``.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

from joserfc.jwk import ECKey

from dpop_middleware.testing import TokenIssuer

ISSUER = "https://issuer.example"
AUDIENCE = "https://api.example"


def key_file() -> Path:
    default = Path(tempfile.gettempdir()) / "dpop-middleware-example-issuer.json"
    return Path(os.environ.get("DPOP_EXAMPLE_ISSUER_KEY") or default)


def _load_or_create(path: Path) -> dict[str, Any]:
    if not path.exists():
        fresh = ECKey.generate_key("P-256").as_dict(private=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(fresh, f)
        try:
            os.link(tmp, path)  # atomic; the first of several workers wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def load_issuer(path: Path) -> TokenIssuer:
    """The example issuer, with its signing key from ``path`` (created if missing)."""
    issuer = TokenIssuer(ISSUER, AUDIENCE)
    issuer.key = ECKey.import_key(_load_or_create(path))
    return issuer


KEY_FILE = key_file()
issuer = load_issuer(KEY_FILE)

#: The settings every example uses: the defaults, the local issuer, and a health check left open.
SETTINGS: dict[str, Any] = issuer.settings(exclude_paths=["/health"])
