"""DPoPWSGIMiddleware (pure WSGI): the app's iterable and start_response are kept intact, headers
are spelled the usual way, and how an environ becomes the request the core checks."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from test_frameworks_support import dpop_headers
from werkzeug.test import Client

from dpop_middleware import DPoPResult, DPoPWSGIMiddleware
from dpop_middleware.testing import DPoPKey, TokenIssuer
from dpop_middleware.wsgi import request_info


@pytest.fixture
def settings(make_settings: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    def make(**extra: Any) -> dict[str, Any]:
        return make_settings(**{"algorithms": ["ES256"], **extra})

    return make


class Body:
    """A response iterable that records whether the server closed it (PEP 3333)."""

    def __init__(self) -> None:
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield b"a"
        yield b"b"

    def close(self) -> None:
        self.closed = True


def test_the_apps_iterable_is_returned_as_is_so_close_is_called(
    settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    body = Body()
    seen: list[DPoPResult] = []

    def app(environ: dict[str, Any], start_response: Any) -> Body:
        seen.append(environ["dpop"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return body

    middleware = DPoPWSGIMiddleware(app, settings=settings())
    token = issuer.token(bound_to=dpop_key)
    headers = dpop_headers(dpop_key, token, "GET", "http://localhost/x", iat=issuer.clock())
    resp = Client(middleware).get("/x", headers=headers)
    assert resp.status_code == 200
    assert resp.get_data() == b"ab"
    resp.close()
    assert body.closed
    assert seen[0].jkt == dpop_key.jkt


def test_exc_info_and_the_write_callable_reach_the_server(
    settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    """With response headers to add, start_response is wrapped: exc_info and the returned
    ``write`` callable must still go through."""
    got: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("cache-control", "max-age=5")])
        try:
            raise RuntimeError("late failure")
        except RuntimeError:
            write = start_response(
                "500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info()
            )
        write(b"written ")
        return [b"returned"]

    def server_start_response(
        status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Any:
        got.setdefault("calls", []).append((status, headers, exc_info))
        return lambda data: got.setdefault("written", []).append(data)

    settings_ = settings(nonce={"secret": "x" * 32, "required": False})
    middleware = DPoPWSGIMiddleware(app, settings=settings_)
    token = issuer.token(bound_to=dpop_key)
    proof = dpop_key.proof("GET", "https://api.example/x", access_token=token, iat=issuer.clock())
    environ = {
        "REQUEST_METHOD": "GET",
        "wsgi.url_scheme": "https",
        "PATH_INFO": "/x",
        "SCRIPT_NAME": "",
        "HTTP_HOST": "api.example",
        "HTTP_AUTHORIZATION": f"DPoP {token}",
        "HTTP_DPOP": proof,
    }
    assert list(middleware(environ, server_start_response)) == [b"returned"]
    assert got["written"] == [b"written "]
    (first, second) = got["calls"]
    assert first[2] is None
    assert [v for k, v in first[1] if k.lower() == "cache-control"] == ["no-store"]
    assert second[0] == "500 Internal Server Error"
    assert second[2] is not None and second[2][0] is RuntimeError
    assert [k for k, _ in second[1]] == ["Content-Type", "DPoP-Nonce", "Cache-Control"]


def test_refusal_header_names_are_spelled_the_usual_way(settings: Any) -> None:
    def app(environ: Any, start_response: Any) -> list[bytes]:  # pragma: no cover - refused
        raise AssertionError

    resp = Client(DPoPWSGIMiddleware(app, settings=settings())).get("/x")
    assert resp.status == "401 Unauthorized"
    assert [k for k, _ in resp.headers.to_wsgi_list()] == [
        "Content-Type",
        "Cache-Control",
        "Access-Control-Expose-Headers",
        "WWW-Authenticate",
        "Content-Length",
    ]
    assert int(resp.headers["Content-Length"]) == len(resp.get_data())


def test_head_refusal_sends_no_body(settings: Any) -> None:
    got: list[Any] = []
    middleware = DPoPWSGIMiddleware(lambda e, s: [b"app"], settings=settings())
    environ = {"REQUEST_METHOD": "HEAD", "PATH_INFO": "/x", "HTTP_HOST": "localhost"}
    body = middleware(environ, lambda status, headers, exc_info=None: got.append((status, headers)))
    assert list(body) == []
    status, headers = got[0]
    assert status == "401 Unauthorized"
    assert ("Content-Length", "65") in headers  # what a GET would get


def test_merged_dpop_header_lines_are_two_proofs(
    settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey
) -> None:
    """A WSGI server joins repeated header lines with commas; two proofs must never pass as one."""

    def app(environ: Any, start_response: Any) -> list[bytes]:  # pragma: no cover - refused
        raise AssertionError

    token = issuer.token(bound_to=dpop_key)
    proof = dpop_key.proof("GET", "http://localhost/x", access_token=token, iat=issuer.clock())
    resp = Client(DPoPWSGIMiddleware(app, settings=settings())).get(
        "/x",
        headers={"Authorization": f"DPoP {token}"},
        environ_overrides={"HTTP_DPOP": f"{proof},{proof}"},
    )
    assert resp.status_code == 401
    assert resp.json == {
        "error": "invalid_dpop_proof",
        "error_description": "More than one DPoP header",
    }


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param({"PATH_INFO": "/me"}, ("", "/me"), id="plain"),
        pytest.param(
            {"SCRIPT_NAME": "/api", "PATH_INFO": "/me", "RAW_URI": "/api/me?x=1"},
            ("/api", "/me"),
            id="mounted_raw_uri",
        ),
        pytest.param(
            {"PATH_INFO": "/a/b", "REQUEST_URI": "/a%2Fb?q"}, ("", "/a%2Fb"), id="request_uri_kept"
        ),
        pytest.param(
            {"PATH_INFO": "/a/b", "RAW_URI": "/other"}, ("", "/a/b"), id="raw_uri_disagrees"
        ),
        pytest.param(
            {"PATH_INFO": "/caf\u00c3\u00a9"}, ("", "/caf%C3%A9"), id="pep3333_latin1_bytes"
        ),
        pytest.param(
            {"PATH_INFO": "/a\u00ff", "RAW_URI": "/a%FF"}, ("", "/a%FF"), id="raw_uri_not_utf8"
        ),
        pytest.param(
            # the werkzeug dev server decodes with replacement: U+FFFD as PEP 3333 latin-1
            {"PATH_INFO": "/a\u00ef\u00bf\u00bd", "REQUEST_URI": "/a%FF"},
            ("", "/a%FF"),
            id="request_uri_lossy_decoded",
        ),
    ],
)
def test_request_info_paths(environ: dict[str, Any], expected: tuple[str, str]) -> None:
    info = request_info({"REQUEST_METHOD": "GET", **environ})
    assert (info.root_path, info.path) == expected


def test_request_info_headers_client_and_server() -> None:
    info = request_info(
        {
            "REQUEST_METHOD": "DELETE",
            "wsgi.url_scheme": "https",
            "PATH_INFO": "/",
            "HTTP_X_FORWARDED_HOST": "a.example",
            "HTTP_DPOP": "p",
            "CONTENT_TYPE": "text/plain",
            "REMOTE_ADDR": "10.1.2.3",
            "SERVER_NAME": "internal",
            "SERVER_PORT": "8443",
            "QUERY_STRING": "a=1",
            "wsgi.input": object(),
        }
    )
    assert info.method == "DELETE"
    assert info.scheme == "https"
    assert info.header_values("x-forwarded-host") == ["a.example"]
    assert info.header_values("dpop") == ["p"]
    assert info.client_ip == "10.1.2.3"
    assert info.server == ("internal", 8443)
    assert info.query_string == "a=1"


# -- the claims: deeply immutable, the same for every request -----------------------------------

ROLES = {"realm_access": {"roles": ["reader"]}}


def try_to_change(result: DPoPResult) -> list[str]:
    """What a careless handler does to the claims; the names of the errors it gets."""
    errors = []
    for change in (
        lambda: result.claims["realm_access"]["roles"].append("admin"),
        lambda: result.claims.__setitem__("admin", True),
        lambda: result.claims["realm_access"].update(roles=["admin"]),
        lambda: result.proof_claims.__setitem__("htm", "POST"),
    ):
        try:
            change()
        except (TypeError, AttributeError) as exc:
            errors.append(type(exc).__name__)
    return errors


def flask_claims_app(settings: dict[str, Any]) -> Any:
    from flask import Flask, jsonify, request

    app = Flask(__name__)
    app.wsgi_app = DPoPWSGIMiddleware(app.wsgi_app, settings=settings)  # type: ignore[method-assign]

    @app.get("/dict")
    def as_dict() -> Any:  # Flask's JSON provider, for a returned dict
        result: DPoPResult = request.environ["dpop"]
        errors = try_to_change(result)
        return {"errors": errors, "claims": result.claims, "proof": result.proof_claims}

    @app.get("/jsonify")
    def as_jsonify() -> Any:
        result: DPoPResult = request.environ["dpop"]
        errors = try_to_change(result)
        return jsonify(errors=errors, claims=result.claims, proof=result.proof_claims)

    return app


def plain_claims_app(settings: dict[str, Any]) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        result: DPoPResult = environ["dpop"]
        errors = try_to_change(result)
        body = json.dumps({"errors": errors, "claims": result.claims, "proof": result.proof_claims})
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body.encode()]

    return DPoPWSGIMiddleware(app, settings=settings)


@pytest.mark.parametrize(
    ("make_app", "path"),
    [
        pytest.param(flask_claims_app, "/dict", id="flask-dict"),
        pytest.param(flask_claims_app, "/jsonify", id="flask-jsonify"),
        pytest.param(plain_claims_app, "/x", id="plain-wsgi-json-dumps"),
    ],
)
def test_the_app_cannot_change_the_claims_the_next_request_sees(
    settings: Any, issuer: TokenIssuer, dpop_key: DPoPKey, make_app: Any, path: str
) -> None:
    client = Client(make_app(settings()))
    token = issuer.token(bound_to=dpop_key, claims=ROLES)
    for _ in range(2):  # the second request gets the cached token's claims
        url = "http://localhost" + path
        headers = dpop_headers(dpop_key, token, "GET", url, iat=issuer.clock())
        resp = client.get(path, headers=headers)
        assert resp.status_code == 200
        body = json.loads(resp.get_data())
        assert body["errors"] == ["AttributeError", "TypeError", "TypeError", "TypeError"]
        assert body["claims"]["realm_access"] == {"roles": ["reader"]}
        assert "admin" not in body["claims"]
        assert body["claims"]["cnf"] == {"jkt": dpop_key.jkt}
        assert body["proof"]["htm"] == "GET"
