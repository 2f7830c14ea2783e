"""Structured fields for the package's log records, passed as ``extra``.

Every refusal and service record carries its fields as attributes of the ``LogRecord``, so a
JSON formatter (``python-json-logger``, structlog's stdlib bridge) emits them as fields; the
text message stays as it is. Values are the raw values, clipped (a JSON formatter escapes them;
the text line quotes them). Never a token, proof, key or claim value: the same fields as the
text line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

#: Attribute names a ``LogRecord`` already has: ``extra`` may not set them (logging raises).
_RESERVED = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def log_extra(
    event: str, fields: Mapping[str, Any], detail: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """``extra`` for one record: ``event`` (the stable first word after ``dpop``), ``fields``,
    then ``detail`` (an error's ``log_detail``) with any name already taken prefixed
    ``detail_`` (``path`` of a path refusal becomes ``detail_path``)."""
    out: dict[str, Any] = {"event": event}
    for name, value in fields.items():
        out[f"dpop_{name}" if name in _RESERVED else name] = (
            value[:300] if isinstance(value, str) else value
        )
    if detail:
        for name, value in detail.items():
            key = name if name not in out and name not in _RESERVED else f"detail_{name}"
            out[key] = value[:300]
    return out


__all__ = ["log_extra"]
