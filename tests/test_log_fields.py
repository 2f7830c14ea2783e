"""Structured log fields (dpop_middleware.logfields): every refusal and service record carries
its fields as ``extra``, so a JSON formatter emits them; the text message is unchanged."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from observe_support import KINDS, Api
from test_frameworks_support import dpop_headers

from dpop_middleware.logfields import log_extra
from dpop_middleware.testing import DPoPKey, TokenIssuer

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    """What python-json-logger does, in short: the message plus every ``extra`` field."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        return json.dumps({"message": record.getMessage(), **fields})


def records(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


@pytest.mark.parametrize("kind", KINDS)
def test_a_refusal_carries_its_fields_and_the_htu_detail(
    kind: str,
    caplog: pytest.LogCaptureFixture,
    make_settings: Callable[..., dict[str, Any]],
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
) -> None:
    caplog.set_level(logging.INFO, "dpop_middleware")
    api = Api(kind, make_settings())
    token = issuer.token(bound_to=dpop_key)
    headers = dpop_headers(dpop_key, token, "GET", "https://elsewhere.example/me")
    assert api.get("/me?x=1", headers) == 401
    (record,) = records(caplog, "refused")
    assert record.getMessage().startswith("dpop refused reason=htu_mismatch status=401 ")
    fields = vars(record)
    assert {k: fields[k] for k in ("reason", "status", "error", "method", "path")} == {
        "reason": "htu_mismatch",
        "status": 401,
        "error": "invalid_dpop_proof",
        "method": "GET",
        "path": "/me",
    }
    assert fields["client"] == ("testclient" if kind == "asgi" else None)  # werkzeug: none
    assert fields["expected_htu"] == f"{api.base}/me"
    assert fields["received_htu"] == "https://elsewhere.example/me"
    line = json.loads(JSONFormatter().format(record))
    assert line["reason"] == "htu_mismatch" and line["received_htu"] == fields["received_htu"]
    for part in token.split(".") + headers[1][1].split("."):
        assert part not in json.dumps(line)


@pytest.mark.parametrize("kind", KINDS)
def test_report_only_records_say_would_refuse(
    kind: str, caplog: pytest.LogCaptureFixture, make_settings: Callable[..., dict[str, Any]]
) -> None:
    caplog.set_level(logging.INFO, "dpop_middleware")
    assert Api(kind, make_settings(mode="report_only")).get("/me") == 200
    (record,) = records(caplog, "would_refuse")
    assert (vars(record)["reason"], vars(record)["status"]) == ("no_credentials", 401)


def test_a_detail_whose_name_is_taken_gets_a_prefix(
    caplog: pytest.LogCaptureFixture, make_settings: Callable[..., dict[str, Any]]
) -> None:
    caplog.set_level(logging.INFO, "dpop_middleware")
    assert Api("wsgi", make_settings(max_path_length=256)).get("/" + "a" * 300) == 400
    (record,) = records(caplog, "refused")
    assert vars(record)["reason"] == "path_too_long" and vars(record)["length"] == "301"
    extra = log_extra("refused", {"path": "/a", "name": "x"}, {"path": "/b", "msg": "y"})
    assert extra == {
        "event": "refused", "path": "/a", "dpop_name": "x", "detail_path": "/b", "detail_msg": "y"
    }  # fmt: skip


def test_service_records_carry_fields_too(
    caplog: pytest.LogCaptureFixture, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    caplog.set_level(logging.INFO, "dpop_middleware")
    settings = {
        "issuer": issuer.issuer,
        "audience": issuer.audience,
        "jwks_uri": "http://127.0.0.1:9/jwks",  # discard port: nothing answers
        "jwks_fetch_timeout": 0.5,
        "clock": issuer.clock,
    }
    api = Api("wsgi", settings)
    token = issuer.token(bound_to=dpop_key)
    assert api.get("/me", dpop_headers(dpop_key, token, "GET", f"{api.base}/me")) == 503
    (record,) = records(caplog, "jwks_fetch_failed")
    assert vars(record)["uri"] == "http://127.0.0.1:9/jwks"
    assert vars(record)["cause"]
    (refused,) = records(caplog, "refused")
    assert vars(refused)["reason"] == "jwks_unavailable"
