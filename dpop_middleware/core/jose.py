"""Strict, small JOSE parsing helpers shared by the proof and token checks."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from typing import Any

#: A compact JWS: three base64url segments (RFC 7515 section 7.1), nothing else.
COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


class MalformedError(ValueError):
    pass


_URLSAFE = bytes.maketrans(b"-_", b"+/")
_PADDING = (b"", b"===", b"==", b"=")  # by len % 4 (1 is never valid: a2b_base64 refuses it)


def b64decode(segment: str) -> bytes:
    """base64url without padding (RFC 7515 section 2), strictly: one or more characters of
    ``A-Z a-z 0-9 - _`` and nothing else (no ``+``, ``/``, ``=``, whitespace or non-ASCII).

    Standing alone, it is the whole syntax check of a JWS segment: ``a2b_base64`` in strict mode
    refuses every character outside the standard alphabet, and the three that alphabet has but
    base64url has not are refused here before ``-`` and ``_`` are mapped onto them.
    """
    if not segment or "+" in segment or "/" in segment or "=" in segment:
        raise MalformedError("bad base64url")
    try:
        data = segment.encode("ascii").translate(_URLSAFE) + _PADDING[len(segment) & 3]
        return binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedError("bad base64url") from exc


def b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise MalformedError("duplicate member")  # RFC 7515 section 5.2 step 4 / RFC 7519
    return out


def _no_constants(name: str) -> Any:
    raise MalformedError(f"{name} is not JSON")


# Built once: ``json.loads`` with keyword arguments builds a new decoder on every call.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]
# The same without the duplicate hook (the C scanner builds the dicts itself), for the fast path.
_PLAIN_SCAN: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder(  # type: ignore[attr-defined]
    parse_constant=_no_constants
).scan_once


def json_object(segment: str) -> dict[str, Any]:
    """Decode a base64url JSON object segment; MalformedError for anything else."""
    return json_object_from(b64decode(segment))


def json_object_from(raw: bytes) -> dict[str, Any]:
    """Decode UTF-8 JSON text that must be one object, with no duplicate member names at any
    depth; MalformedError for anything else.

    Fast path: the C scanner without the duplicate hook, on the whole text. Its object has no
    duplicates at any depth when it has one more member than the text has commas: every member
    after the first needs a comma of its own at the top level, so ``commas + 1 >= members >=
    len(object)``, and any comma elsewhere (in a string, an array, or a nested object, which needs
    one to hold a duplicate) breaks the equality. Anything else takes the hooked decoder.
    """
    try:
        text = raw.decode("utf-8")
        try:
            value, end = _PLAIN_SCAN(text, 0)
        except StopIteration:
            end = -1
        if end == len(text) and type(value) is dict and len(value) == text.count(",") + 1:
            return value
        # The full path: surrounding whitespace, commas inside values, errors, non-objects.
        try:
            value, end = _SCAN(text, 0)
        except StopIteration:
            end = -1
        if end != len(text):
            value = _DECODER.decode(text)
    except MalformedError:
        raise  # the duplicate hook's own (a ValueError too), kept as it is
    except (ValueError, RecursionError) as exc:
        # ValueError covers UnicodeDecodeError and JSONDecodeError, and also the plain
        # ValueError that int() raises for a number of more than 4300 digits
        # (sys.set_int_max_str_digits): all of it is a malformed JOSE object, never a 500.
        raise MalformedError("bad JSON") from exc
    if not isinstance(value, dict):
        raise MalformedError("not a JSON object")
    return value
