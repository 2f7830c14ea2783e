"""The examples as shipped: each module imported, its app driven through its test client with
tokens from the same local issuer the example trusts. (tests/test_servers.py runs each one under
its real server command.)"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from test_frameworks_support import django_urls, starlette_test_client
from werkzeug.test import Client

from dpop_middleware.errors import ConfigurationError
from dpop_middleware.testing import DPoPKey
from examples import local_issuer

Send = Callable[[str, list[tuple[str, str]]], tuple[int, dict[str, str], Any]]


def asgi_sender(app: Any) -> tuple[Send, str]:
    client = starlette_test_client()(app)

    def send(path: str, headers: list[tuple[str, str]]) -> tuple[int, dict[str, str], Any]:
        r = client.get(path, headers=headers)
        return r.status_code, dict(r.headers), r.json()

    return send, "http://testserver"


def wsgi_sender(app: Any) -> tuple[Send, str]:
    client = Client(app)

    def send(path: str, headers: list[tuple[str, str]]) -> tuple[int, dict[str, str], Any]:
        r = client.get(path, headers=headers)
        return r.status_code, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.get_data())

    return send, "http://localhost"


EXAMPLES = [
    pytest.param("examples.starlette_app", "app", asgi_sender, id="starlette"),
    pytest.param("examples.fastapi_app", "app", asgi_sender, id="fastapi"),
    pytest.param("examples.flask_app", "app", wsgi_sender, id="flask"),
    pytest.param("examples.django_project.wsgi", "application", wsgi_sender, id="django_wsgi"),
    pytest.param("examples.django_project.asgi", "application", asgi_sender, id="django_asgi"),
]


@pytest.mark.parametrize(("module", "attr", "sender"), EXAMPLES)
def test_example(module: str, attr: str, sender: Callable[[Any], tuple[Send, str]]) -> None:
    app = getattr(importlib.import_module(module), attr)
    send, base = sender(app)
    key = DPoPKey.generate()
    token = local_issuer.issuer.token(bound_to=key)
    proof = key.proof("GET", f"{base}/me", access_token=token)

    status, _, body = send("/me", [("Authorization", f"DPoP {token}"), ("DPoP", proof)])
    assert status == 200
    assert body == {"sub": "user-123", "scheme": "DPoP", "jkt": key.jkt, "scope": "read"}

    status, headers, body = send("/me", [("Authorization", f"DPoP {token}"), ("DPoP", proof)])
    assert status == 401
    assert body == {
        "error": "invalid_dpop_proof",
        "error_description": "DPoP proof has already been used",
    }
    assert headers["cache-control"] == "no-store"

    status, headers, body = send("/me", [])
    assert status == 401
    assert body["error"] == "unauthorized"
    assert headers["www-authenticate"].startswith('DPoP algs="ES256 ')

    status, _, body = send("/health", [])
    assert (status, body) == (200, {"ok": True})


def test_starlette_example_websocket() -> None:
    from examples.starlette_app import app

    key = DPoPKey.generate()
    token = local_issuer.issuer.token(bound_to=key)
    proof = key.proof("GET", "http://testserver/ws", access_token=token)
    client = starlette_test_client()(app)
    with client.websocket_connect(
        "/ws", headers={"Authorization": f"DPoP {token}", "DPoP": proof}
    ) as ws:
        assert ws.receive_json() == {
            "sub": "user-123",
            "scheme": "DPoP",
            "jkt": key.jkt,
            "scope": "read",
        }


def test_examples_share_one_issuer_key_file() -> None:
    again = local_issuer.load_issuer(local_issuer.KEY_FILE)
    assert again.jwks == local_issuer.issuer.jwks
    assert local_issuer.SETTINGS["jwks"] == local_issuer.issuer.jwks
    assert local_issuer.SETTINGS["exclude_paths"] == ["/health"]


# -- the Django helper --------------------------------------------------------------------------


def test_dpop_settings_reads_django_settings_dpop() -> None:
    from django.test.utils import override_settings

    from dpop_middleware.django import dpop_settings

    with django_urls():
        assert dpop_settings() == local_issuer.SETTINGS
        assert dpop_settings() is not local_issuer.SETTINGS  # a copy
        with (
            override_settings(DPOP="not a dict"),
            pytest.raises(ConfigurationError, match="Django setting 'DPOP' is a str"),
        ):
            dpop_settings()
        with pytest.raises(ConfigurationError, match="Django setting 'API_DPOP' is missing"):
            dpop_settings("API_DPOP")


def test_dpop_result_is_none_without_a_result() -> None:
    from django.test import RequestFactory

    from dpop_middleware.django import dpop_result

    with django_urls():
        request = RequestFactory().get("/me")
        assert dpop_result(request) is None
        request.META["dpop"] = "not a result"
        assert dpop_result(request) is None
