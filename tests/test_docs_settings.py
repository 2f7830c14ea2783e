"""The documentation cannot drift from the code: the settings reference lists every key with the
code's default, Troubleshooting has a row for every reason code, and the README stays one screen
whose links resolve."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any

import pytest

from dpop_middleware import settings as settings_module
from dpop_middleware.cli import STEPS
from dpop_middleware.core.metadata import DERIVED
from dpop_middleware.replay.redis import DEFAULTS as REDIS_DEFAULTS
from dpop_middleware.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
ROW = re.compile(r"^\| `([^`]+)` \|(.*)$", re.M)
#: Keys whose default the table describes in words (the code has no literal default for them).
IN_WORDS = {
    "nonce.secret": "required",
    "nonce.context": "derived",
    "replay_store.url": "required",
    "replay_store.max_entries": "derived",
    "required_scopes[].path": "required",
    "required_scopes[].scopes": "required",
    "resource_metadata.resource": "required",
    "resource_metadata.authorization_servers": "required",
    "resource_metadata.*": "none",
    "introspection.client_id": "required",
    "introspection.client_secret": "required",
    "introspection.endpoint": "derived",
}
MINIMAL = {"issuer": "https://as.example", "audience": "https://api.example", "jwks": {"keys": []}}


def documented() -> dict[str, str]:
    """``key`` -> the default cell of the settings reference table."""
    text = (DOCS / "settings.md").read_text()
    table = text[text.index("| key | type | default |") :].split("\n\n", 1)[0]
    rows: dict[str, str] = {}
    for key, rest in ROW.findall(table):
        assert key not in rows, f"{key} is in the table twice"
        rows[key] = [c.strip() for c in rest.split(" | ")][1]
    return rows


def shown(value: Any) -> str:
    """How the table writes a default from the code."""
    if callable(value):
        return f"`{value.__module__}.{value.__name__}`"
    if isinstance(value, bool) or value is None:
        return f"`{value}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    if isinstance(value, int | float):
        return f"`{value}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, tuple) and value and all(isinstance(v, str) for v in value):
        return f"`{' '.join(value)}`"
    if value == ():
        return "`[]`"
    raise AssertionError(f"no rendering for {value!r}")


def test_every_settings_key_is_documented_and_nothing_else() -> None:
    keys = set(documented())
    code = set(Settings.__dataclass_fields__)
    code |= {f"nonce.{k}" for k in settings_module._NONCE_KEYS}
    code |= {f"required_scopes[].{k}" for k in settings_module._RULE_KEYS}
    code |= {f"introspection.{k}" for k in settings_module._INTROSPECTION_KEYS}
    code |= {f"replay_store.{k}" for k in REDIS_DEFAULTS} | {"replay_store.max_entries"}
    code |= {"resource_metadata.resource", "resource_metadata.authorization_servers"}
    code |= {"resource_metadata.*"}
    assert sorted(code - keys) == [], "settings missing from docs/settings.md"
    assert sorted(keys - code) == [], "docs/settings.md documents keys the code does not have"


def test_documented_defaults_are_the_codes() -> None:
    rows = documented()
    for key, cell in rows.items():
        if key in IN_WORDS:
            assert cell.startswith(IN_WORDS[key]), (key, cell)
    for field in dataclasses.fields(Settings):
        default = field.default
        assert rows[field.name].startswith(shown(default)), (field.name, rows[field.name])
    nonce = Settings.from_dict({**MINIMAL, "nonce": {"secret": "s" * 32}}).nonce
    assert nonce is not None
    for key in ("lifetime", "accepted_steps", "required", "freshness"):
        assert rows[f"nonce.{key}"].startswith(shown(getattr(nonce, key))), key
    rule = Settings.from_dict(
        {**MINIMAL, "required_scopes": [{"path": "/a", "scopes": ["s"]}]}
    ).required_scopes[0]
    assert rows["required_scopes[].methods"].startswith(shown(rule.methods))
    assert rule.claims == () and rows["required_scopes[].claims"].startswith("`{}`")
    for key, value in REDIS_DEFAULTS.items():
        if f"replay_store.{key}" not in IN_WORDS:
            assert rows[f"replay_store.{key}"].startswith(shown(value)), key


def test_the_parser_gives_the_dataclass_defaults() -> None:
    """A key left out of the dict gets what the table says (the dataclass default), not some
    other default hidden in the parser."""
    built = Settings.from_dict(MINIMAL)
    for field in dataclasses.fields(Settings):
        if field.name in MINIMAL or field.name == "replay_store":
            continue
        default = field.default
        assert getattr(built, field.name) == default, field.name
    assert built.clock is time.time


def test_derived_metadata_members_are_named() -> None:
    text = (DOCS / "settings.md").read_text()
    for member in DERIVED:
        assert f"`{member}`" in text, member


def test_troubleshooting_has_every_reason_code() -> None:
    text = (DOCS / "troubleshooting.md").read_text()
    rows = {key for key, _ in ROW.findall(text)}
    reasons = {reason for _, _, codes in STEPS for reason in codes}
    assert sorted(reasons - rows) == [], "reason codes missing from docs/troubleshooting.md"
    assert sorted(rows - reasons) == [], "docs/troubleshooting.md has rows for unknown codes"


def test_security_model_lists_every_reason_code() -> None:
    text = (DOCS / "security.md").read_text()
    for _, _, codes in STEPS:
        for reason in codes:
            if reason not in ("insufficient_scope", "claim_mismatch", "not_verified"):
                assert f"`{reason}`" in text, reason


def test_readme_is_one_screen_of_links_that_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 100
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", readme)
    assert len(links) >= 15
    for link in links:
        assert (ROOT / link).is_file(), link


@pytest.mark.parametrize("page", ["token-sources.md", "observability.md"])
def test_pages_other_branches_fill_in_exist(page: str) -> None:
    assert (DOCS / page).read_text().startswith("# ")
