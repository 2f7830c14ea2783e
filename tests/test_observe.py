"""The observer interface (dpop_middleware.observe): what the Engine reports, on ASGI and WSGI,
and the settings that turn observers on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from observe_support import KINDS, Api
from test_frameworks_support import dpop_headers

from dpop_middleware.errors import ConfigurationError
from dpop_middleware.observe import (
    OBSERVER_METHODS,
    BaseObserver,
    FanOut,
    Observer,
    ReasonLabels,
    RequestEvent,
    combine,
    store_name,
)
from dpop_middleware.replay import MemoryReplayStore
from dpop_middleware.settings import Settings
from dpop_middleware.testing import DPoPKey, TokenIssuer


class Recorder(BaseObserver):
    def __init__(self) -> None:
        self.events: list[RequestEvent] = []
        self.stores: list[tuple[str, bool]] = []
        self.calls: list[str] = []

    def request_started(self) -> Any:
        self.calls.append("request_started")
        return "handle"

    def request_finished(self, handle: Any, event: RequestEvent) -> None:
        assert handle == "handle"
        self.calls.append("request_finished")
        self.events.append(event)

    def replay_store_started(self) -> Any:
        self.calls.append("replay_store_started")
        return "store"

    def replay_store_finished(
        self, handle: Any, store: str, seconds: float, error: BaseException | None
    ) -> None:
        assert handle == "store" and seconds >= 0
        self.calls.append("replay_store_finished")
        self.stores.append((store, error is not None))


@pytest.mark.parametrize("kind", KINDS)
def test_every_outcome_reaches_the_observer(
    kind: str, make_settings: Callable[..., dict[str, Any]], issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    rec = Recorder()
    api = Api(kind, make_settings(observers=[rec], exclude_paths=["/health"]))
    token = issuer.token(bound_to=dpop_key)
    headers = dpop_headers(dpop_key, token, "GET", f"{api.base}/me", iat=issuer.clock())
    assert api.get("/me", headers) == 200
    assert api.get("/me", headers) == 401  # replayed
    assert api.get("/me") == 401  # no credentials
    assert api.get("/health") == 200
    got = [(e.outcome, e.reason, e.status, e.scheme, e.jkt) for e in rec.events]
    assert got == [
        ("accepted", "", 0, "DPoP", dpop_key.jkt),
        ("refused", "replayed", 401, "", None),
        ("refused", "no_credentials", 401, "", None),
        ("passed", "", 0, "", None),
    ]
    assert rec.events[0].iat_offset == 0.0  # the frozen clock: the proof was made "now"
    assert all(e.seconds > 0 for e in rec.events)
    assert rec.stores == [("memory", False), ("memory", False)]
    assert rec.calls[:4] == [
        "request_started", "replay_store_started", "replay_store_finished", "request_finished"
    ]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_report_only_reports_would_refuse_and_store_down_reports_the_error(
    kind: str, make_settings: Callable[..., dict[str, Any]], issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    rec = Recorder()
    api = Api(kind, make_settings(observers=[rec], mode="report_only"))
    assert api.get("/me") == 200
    assert [(e.outcome, e.reason, e.status) for e in rec.events] == [
        ("would_refuse", "no_credentials", 401)
    ]
    rec = Recorder()
    down = Api(kind, make_settings(observers=[rec]), store_down=True)
    token = issuer.token(bound_to=dpop_key)
    assert down.get("/me", dpop_headers(dpop_key, token, "GET", f"{down.base}/me")) == 503
    assert [(e.outcome, e.reason, e.status) for e in rec.events] == [
        ("refused", "replay_store_unavailable", 503)
    ]
    assert rec.stores == [("asyncfailingstore" if kind == "asgi" else "failingstore", True)]


def test_nonce_issued_is_reported(
    make_settings: Callable[..., dict[str, Any]], issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    rec = Recorder()
    api = Api("asgi", make_settings(observers=[rec], nonce={"secret": "s" * 32}))
    token = issuer.token(bound_to=dpop_key)
    assert api.get("/me", dpop_headers(dpop_key, token, "GET", f"{api.base}/me")) == 401
    assert (rec.events[0].reason, rec.events[0].nonce_issued) == ("nonce_missing", True)


def test_without_observers_the_engine_holds_none(make_settings: Any) -> None:
    from dpop_middleware.flow import Engine

    assert Engine(Settings.from_dict(make_settings()))._observer is None
    one = Recorder()
    assert Engine(Settings.from_dict(make_settings(observers=[one])))._observer is one


def test_combine_and_fan_out() -> None:
    a, b = Recorder(), Recorder()
    assert combine(None, None) is None
    assert combine(None, a) is a
    both = combine(a, None, b)
    assert isinstance(both, FanOut)
    handle = both.request_started()
    event = RequestEvent("passed", "", 0, "", None, 0.1, None, False)
    both.request_finished(handle, event)
    assert a.events == b.events == [event]
    assert isinstance(BaseObserver(), Observer)
    assert "request_finished" in OBSERVER_METHODS and "introspection_cache" in OBSERVER_METHODS


def test_store_names_are_short_and_bounded() -> None:
    assert store_name(MemoryReplayStore()) == "memory"
    assert store_name(Recorder()) == "recorder"


def test_reason_labels_are_bounded() -> None:
    labels = ReasonLabels(limit=3)
    assert labels("replayed") == "replayed"
    assert labels("Bad Reason!") == "other"
    assert [labels(f"r{i}") for i in range(4)] == ["r0", "r1", "other", "other"]
    assert labels("replayed") == "replayed"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param({"metrics": "yes"}, "setting 'metrics': got 'yes'", id="metrics-value"),
        pytest.param(
            {"metrics": {"registy": None}}, "unknown setting metrics.'registy' (did you mean "
            "'registry'?)", id="metrics-key",
        ),
        pytest.param({"tracing": 1}, "setting 'tracing': got 1", id="tracing-value"),
        pytest.param(
            {"tracing": {"provider": None}}, "unknown setting tracing.'provider'", id="tracing-key"
        ),
        pytest.param({"observers": "x"}, "setting 'observers': got 'x'", id="observers-str"),
        pytest.param(
            {"observers": [object()]}, "setting 'observers[0]'", id="observers-not-an-observer"
        ),
    ],
)  # fmt: skip
def test_bad_observability_settings_fail_at_start_up(
    make_settings: Callable[..., dict[str, Any]], extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError) as err:
        Settings.from_dict(make_settings(**extra))
    assert message in str(err.value)


def test_metrics_need_prometheus_client(
    make_settings: Callable[..., dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "dpop_middleware.prometheus", raising=False)
    with pytest.raises(ConfigurationError, match=r"pip install 'dpop-middleware\[prometheus\]'"):
        Settings.from_dict(make_settings(metrics=True))
