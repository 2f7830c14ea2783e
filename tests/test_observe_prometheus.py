"""Prometheus metrics (dpop_middleware.prometheus) on a real ``prometheus_client`` registry:
counters and histograms move as expected on ASGI and WSGI."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from observe_support import KINDS, Api
from prometheus_client import CollectorRegistry, generate_latest
from test_frameworks_support import dpop_headers

from dpop_middleware.errors import ConfigurationError
from dpop_middleware.prometheus import PrometheusObserver, metrics_registry, prometheus_observer
from dpop_middleware.settings import Settings
from dpop_middleware.testing import DPoPKey, TokenIssuer


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def requests(registry: CollectorRegistry, outcome: str, reason: str = "", status: str = "") -> float:
    return value(registry, "dpop_requests_total", outcome=outcome, reason=reason, status=status)


@pytest.mark.parametrize("kind", KINDS)
def test_accepted_refused_replayed_and_excluded_requests(
    kind: str,
    registry: CollectorRegistry,
    make_settings: Callable[..., dict[str, Any]],
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
) -> None:
    settings = make_settings(metrics={"registry": registry}, exclude_paths=["/health"])
    api = Api(kind, settings)
    token = issuer.token(bound_to=dpop_key)
    url = f"{api.base}/me"
    first = dpop_headers(dpop_key, token, "GET", url, iat=issuer.clock() - 2)
    assert api.get("/me", first) == 200
    assert api.get("/me", dpop_headers(dpop_key, token, "GET", url, iat=issuer.clock() + 3)) == 200
    assert api.get("/me", first) == 401  # replayed
    assert api.get("/me", dpop_headers(dpop_key, token, "POST", url)) == 401  # htm
    assert api.get("/me", [("Authorization", f"DPoP {token}")]) == 401  # no proof
    assert api.get("/me", [("Authorization", f"Bearer {token}")]) == 401  # bearer not allowed
    assert api.get("/me") == 401
    assert api.get("/health") == 200

    assert requests(registry, "accepted") == 2
    assert requests(registry, "refused", "replayed", "401") == 1
    assert requests(registry, "refused", "htm_mismatch", "401") == 1
    assert requests(registry, "refused", "proof_missing", "401") == 1
    assert requests(registry, "refused", "bearer_not_allowed", "401") == 1
    assert requests(registry, "refused", "no_credentials", "401") == 1
    assert requests(registry, "passed") == 1
    assert value(registry, "dpop_verify_seconds_count") == 8
    assert 0 < value(registry, "dpop_verify_seconds_sum") < 8
    # Three jti records: two accepted, one replayed (the other refusals stop before the store).
    assert value(registry, "dpop_replay_store_seconds_count") == 3
    assert value(registry, "dpop_replay_store_errors_total", store="memory") == 0
    # Clock skew of accepted proofs: one 2 s behind, one 3 s ahead.
    assert value(registry, "dpop_proof_iat_offset_seconds_count") == 2
    # No _sum: with buckets below zero, prometheus_client leaves it out (OpenMetrics).
    assert value(registry, "dpop_proof_iat_offset_seconds_bucket", le="-2.0") == 1
    assert value(registry, "dpop_proof_iat_offset_seconds_bucket", le="2.0") == 1
    assert value(registry, "dpop_proof_iat_offset_seconds_bucket", le="5.0") == 2
    assert value(registry, "dpop_nonce_issued_total") == 0
    text = generate_latest(registry).decode()
    assert token not in text and first[1][1] not in text and dpop_key.jkt not in text


@pytest.mark.parametrize("kind", KINDS)
def test_report_only_counts_would_refuse(
    kind: str, registry: CollectorRegistry, make_settings: Callable[..., dict[str, Any]]
) -> None:
    api = Api(kind, make_settings(metrics={"registry": registry}, mode="report_only"))
    assert api.get("/me") == 200
    assert api.get("/me", [("Authorization", "DPoP x.y.z")]) == 200
    assert requests(registry, "would_refuse", "no_credentials", "401") == 1
    assert requests(registry, "refused", "no_credentials", "401") == 0
    assert value(registry, "dpop_verify_seconds_count") == 2


@pytest.mark.parametrize("kind", KINDS)
def test_store_down_counts_the_error_and_the_503(
    kind: str,
    registry: CollectorRegistry,
    make_settings: Callable[..., dict[str, Any]],
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
) -> None:
    api = Api(kind, make_settings(metrics={"registry": registry}), store_down=True)
    token = issuer.token(bound_to=dpop_key)
    assert api.get("/me", dpop_headers(dpop_key, token, "GET", f"{api.base}/me")) == 503
    store = "asyncfailingstore" if kind == "asgi" else "failingstore"
    assert value(registry, "dpop_replay_store_errors_total", store=store) == 1
    assert value(registry, "dpop_replay_store_seconds_count") == 1
    assert requests(registry, "refused", "replay_store_unavailable", "503") == 1


def test_nonces_issued_are_counted(
    registry: CollectorRegistry,
    make_settings: Callable[..., dict[str, Any]],
    issuer: TokenIssuer,
    dpop_key: DPoPKey,
) -> None:
    api = Api("wsgi", make_settings(metrics={"registry": registry}, nonce={"secret": "s" * 32}))
    token = issuer.token(bound_to=dpop_key)
    assert api.get("/me", dpop_headers(dpop_key, token, "GET", f"{api.base}/me")) == 401
    assert requests(registry, "refused", "nonce_missing", "401") == 1
    assert value(registry, "dpop_nonce_issued_total") == 1


@pytest.mark.parametrize("kind", KINDS)
def test_jwks_fetches_are_counted(
    kind: str, registry: CollectorRegistry, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    with issuer.serve(clients={}) as server:
        api = Api(kind, server.settings(metrics={"registry": registry}, clock=issuer.clock))
        token = issuer.token(bound_to=dpop_key)
        assert api.get("/me", dpop_headers(dpop_key, token, "GET", f"{api.base}/me")) == 200
    assert value(registry, "dpop_jwks_fetch_total", result="ok") == 1
    assert value(registry, "dpop_jwks_fetch_total", result="error") == 0


def test_the_token_sources_metrics_exist_before_their_feature(registry: CollectorRegistry) -> None:
    observer = prometheus_observer(registry)
    observer.fetch_finished(None, "metadata", "error")
    observer.fetch_finished(None, "introspection", "ok")
    observer.introspection_cache(True)
    observer.introspection_cache(False)
    observer.introspection_cache(False)
    assert value(registry, "dpop_metadata_fetch_total", result="error") == 1
    assert value(registry, "dpop_introspection_total", result="ok") == 1
    assert value(registry, "dpop_introspection_cache_total", result="hit") == 1
    assert value(registry, "dpop_introspection_cache_total", result="miss") == 2


def test_one_set_of_metrics_per_registry(
    registry: CollectorRegistry, make_settings: Callable[..., dict[str, Any]]
) -> None:
    a = Settings.from_dict(make_settings(metrics={"registry": registry}))
    b = Settings.from_dict(make_settings(metrics={"registry": registry}))
    assert isinstance(a.metrics, PrometheusObserver) and a.metrics is b.metrics


def test_metrics_true_uses_the_default_registry(make_settings: Any) -> None:
    from prometheus_client import REGISTRY

    settings = Settings.from_dict(make_settings(metrics=True))
    assert settings.metrics is prometheus_observer(REGISTRY)
    assert metrics_registry() is REGISTRY


def test_a_registry_that_is_not_one_is_refused(make_settings: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"setting 'metrics\.registry'"):
        Settings.from_dict(make_settings(metrics={"registry": object()}))


_WORKER = """
import sys
from werkzeug.test import Client
from dpop_middleware import DPoPWSGIMiddleware
from dpop_middleware.prometheus import MultiProcessObserver
from dpop_middleware.testing import DPoPKey, TokenIssuer

issuer = TokenIssuer(audience="https://api.example")
def app(environ, start_response):
    start_response("200 OK", [])
    return [b"ok"]
middleware = DPoPWSGIMiddleware(app, settings=issuer.settings(metrics=True))
assert isinstance(middleware.settings.metrics, MultiProcessObserver)
client, key = Client(middleware), DPoPKey.generate()
token = issuer.token(bound_to=key)
for _ in range(int(sys.argv[1])):
    proof = key.proof("GET", "http://localhost/me", access_token=token)
    assert client.get("/me", headers={"Authorization": f"DPoP {token}", "DPoP": proof}).status_code == 200
assert client.get("/me").status_code == 401
"""

_SCRAPE = """
from prometheus_client import generate_latest
from dpop_middleware.prometheus import metrics_registry
print(generate_latest(metrics_registry()).decode())
"""


def test_several_worker_processes_add_up(tmp_path: Any) -> None:
    """PROMETHEUS_MULTIPROC_DIR: each worker process writes its own files; /metrics adds them."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    for count in (3, 4):  # two workers, one after the other
        subprocess.run([sys.executable, "-c", _WORKER, str(count)], env=env, check=True)
    text = subprocess.run(
        [sys.executable, "-c", _SCRAPE], env=env, check=True, capture_output=True, text=True
    ).stdout
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")
    assert float(lines['dpop_requests_total{outcome="accepted",reason="",status=""}']) == 7
    assert float(lines['dpop_requests_total{outcome="refused",reason="no_credentials",status="401"}']) == 2
    assert float(lines["dpop_verify_seconds_count"]) == 9
    assert float(lines["dpop_replay_store_seconds_count"]) == 7
    assert float(lines["dpop_proof_iat_offset_seconds_count"]) == 7


def test_one_process_uses_its_own_collector(registry: CollectorRegistry) -> None:
    assert isinstance(prometheus_observer(registry), PrometheusObserver)


@pytest.mark.parametrize(
    ("module", "kind"),
    [
        pytest.param("examples.metrics_starlette", "asgi", id="starlette"),
        pytest.param("examples.metrics_fastapi", "asgi", id="fastapi"),
        pytest.param("examples.metrics_flask", "wsgi", id="flask"),
    ],
)
def test_the_metrics_examples_expose_what_they_count(module: str, kind: str) -> None:
    import importlib
    import json

    from test_frameworks_support import starlette_test_client
    from werkzeug.test import Client

    from examples import local_issuer

    app = importlib.import_module(module).app
    client = starlette_test_client()(app) if kind == "asgi" else Client(app)
    base = "http://testserver" if kind == "asgi" else "http://localhost"

    def scrape() -> dict[str, float]:
        text = client.get("/metrics").get_data(as_text=True) if kind == "wsgi" else None
        text = text if text is not None else client.get("/metrics").text
        out = {}
        for line in text.splitlines():
            if line.startswith("dpop_requests_total{"):
                name, number = line.rsplit(" ", 1)
                out[name] = float(number)
        return out

    before = scrape()
    key = DPoPKey.generate()
    token = local_issuer.issuer.token(bound_to=key)
    resp = client.get("/me", headers=dpop_headers(key, token, "GET", f"{base}/me"))
    body = json.loads(resp.get_data() if kind == "wsgi" else resp.content)
    assert body == {"sub": "user-123", "jkt": key.jkt}
    assert client.get("/me").status_code == 401
    after = scrape()
    accepted = 'dpop_requests_total{outcome="accepted",reason="",status=""}'
    refused = 'dpop_requests_total{outcome="refused",reason="no_credentials",status="401"}'
    assert after[accepted] == before.get(accepted, 0) + 1
    assert after[refused] == before.get(refused, 0) + 1


def test_the_dashboard_queries_only_metrics_we_export(registry: CollectorRegistry) -> None:
    import json
    import re
    from pathlib import Path

    from dpop_middleware.observe import RequestEvent

    # One store error, so that the error counter has a series (it has none before).
    prometheus_observer(registry).request_finished(
        None, RequestEvent("refused", "x", 503, "", None, 0.1, None, False, "redis", 0.1, True)
    )
    exported = {
        line.split("{")[0].split(" ")[0]
        for line in generate_latest(registry).decode().splitlines()
        if line and not line.startswith("#")
    }
    dashboard = Path(__file__).parent.parent / "examples" / "dashboard" / "grafana-dashboard.json"
    exprs = [t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\bdpop_\w+", expr)}
    assert used and used <= exported, used - exported
