"""The refusal log line under a real uvicorn process: request values cannot inject into it.

uvicorn (``--proxy-headers``, on by default) believes ``X-Forwarded-For`` from 127.0.0.1 and puts
its value in the client address; a bad ``Host`` goes into the ``host=`` field. Whatever a client
sends, every field of the line parses back to exactly what was sent, no control character reaches
the log, and no value can pass for another field (``reason=``, ``status=``).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from test_servers import headers_for, raw_request, running, send

from dpop_middleware.testing import DPoPKey

APP = "examples.starlette_app:app"

# Each field is `` name=value``: a bare value has no space or quote; a quoted one is a Python
# string literal (what ``repr`` writes).
_FIELD = re.compile(r""" (\w+)=('(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*"|[^\s'"]+)""")
_HEAD = "WARNING dpop_middleware dpop refused"
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")

LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(name)s %(message)s"}},
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "stream": "ext://sys.stderr",
        }
    },
    "loggers": {"dpop_middleware": {"handlers": ["stderr"], "level": "INFO", "propagate": False}},
}

FORGED = [
    pytest.param("\x1b[2J x reason=ok status=200", id="esc-and-forged-fields"),
    pytest.param("\x9b2J reason=ok status=200", id="c1-csi"),
    pytest.param("1.2.3.4 reason=ok status=200 error=none", id="plain-words"),
    pytest.param("a' reason='ok\" status=\"200", id="both-quotes"),
    pytest.param("x\\' reason=ok", id="backslash-quote"),
]


def parse_refusal(line: str) -> list[tuple[str, str]]:
    """The fields of one refusal line, in order, each value as it was before quoting."""
    assert line.startswith(_HEAD), line
    rest, fields = line[len(_HEAD) :], []
    while rest:
        match = _FIELD.match(rest)
        assert match is not None, f"not a field: {rest!r}"
        raw = match[2]
        fields.append((match[1], ast.literal_eval(raw) if raw[0] in "'\"" else raw))
        rest = rest[match.end() :]
    return fields


def refusal_lines(tmp_path: Path, request: Callable[[int], tuple[int, bytes]]) -> list[str]:
    """Start uvicorn with the ``dpop_middleware`` logger on stderr, send one ``request(port)``,
    stop it, and return its refusal lines, after checking its whole output."""
    config = tmp_path / "log.json"
    config.write_text(json.dumps(LOG_CONFIG))
    log = tmp_path / "server.log"
    with running("uvicorn", APP, "--log-config", str(config), log=log) as port:
        status, body = request(port)
        assert status in (400, 401), body
    data = log.read_bytes()
    assert b"\x1b" not in data and b"\xc2\x9b" not in data and b"\x9b" not in data
    text = data.decode("utf-8")
    assert _CONTROL.search(text) is None, text
    return [line for line in text.splitlines() if "dpop refused" in line]


@pytest.mark.parametrize("value", FORGED)
def test_a_forwarded_client_address_cannot_inject_into_the_refusal_line(
    value: str, tmp_path: Path
) -> None:
    (line,) = refusal_lines(
        tmp_path, lambda port: send(port, "GET", "/me", [("X-Forwarded-For", value)])[::2]
    )
    assert parse_refusal(line) == [
        ("reason", "no_credentials"),
        ("status", "401"),
        ("error", "None"),
        ("method", "GET"),
        ("path", "/me"),
        ("client", value.strip()),
    ]


def test_a_bad_host_cannot_inject_into_the_refusal_line(tmp_path: Path) -> None:
    host = "\x1b[31mevil reason=ok status=200"
    key = DPoPKey.generate()
    # A valid token and proof, so the checks reach the Host (after the proof's signature).
    (line,) = refusal_lines(
        tmp_path,
        lambda port: raw_request(
            port, b"/me", headers_for(key, f"http://127.0.0.1:{port}/me"), host=host
        ),
    )
    fields = parse_refusal(line)
    assert [name for name, _ in fields].count("reason") == 1
    assert fields[:2] == [("reason", "invalid_host"), ("status", "400")]
    assert fields[-2:] == [("client", "127.0.0.1"), ("host", host)]
