"""Property-based: whatever arrives in the Authorization and DPoP headers, the core only ever
answers with its own refusals (never an unexpected exception, so never a 500)."""

from __future__ import annotations

import json
from typing import Any

from conftest import API, FrozenClock
from core_helpers import Harness, request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpop_middleware.core.jose import b64encode
from dpop_middleware.core.verifier import Refusal
from dpop_middleware.testing import DPoPKey, TokenIssuer

CLOCK = FrozenClock()
ISSUER = TokenIssuer(audience=API, clock=CLOCK)
KEY = DPoPKey.generate()
TOKEN = ISSUER.token(bound_to=KEY)
HARNESS = Harness(ISSUER.settings(clock=CLOCK))
BEARER_HARNESS = Harness(ISSUER.settings(clock=CLOCK, mode="dpop_or_bearer"))
URL = API + "/items"

header_text = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
    st.from_regex(
        r"[A-Za-z0-9_\-]{0,60}\.[A-Za-z0-9_\-]{0,60}\.[A-Za-z0-9_\-]{0,60}", fullmatch=True
    ),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def check(h: Harness, headers: list[tuple[str, str]]) -> None:
    outcome = h.engine.run_sync(request("GET", URL, headers), h.store)
    assert outcome.result is None or outcome.refusal is None
    if outcome.refusal is not None:
        assert isinstance(outcome.refusal, Refusal)
        assert outcome.refusal.status in (400, 401, 503)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    auth=header_text, proof=header_text, scheme=st.sampled_from(["DPoP ", "Bearer ", "", "dpop  "])
)
def test_arbitrary_header_values(auth: str, proof: str, scheme: str) -> None:
    for h in (HARNESS, BEARER_HARNESS):
        check(h, [("authorization", scheme + auth), ("dpop", proof)])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=st.dictionaries(st.sampled_from(["typ", "alg", "jwk", "crit", "kid"]), json_values),
       payload=json_values)  # fmt: skip
def test_structured_garbage_proofs(header: dict[str, Any], payload: Any) -> None:
    enc = lambda obj: b64encode(json.dumps(obj).encode())  # noqa: E731
    proof = f"{enc(header)}.{enc(payload)}.{b64encode(b'x' * 64)}"
    check(HARNESS, [("authorization", f"DPoP {TOKEN}"), ("dpop", proof)])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jwk=st.dictionaries(st.sampled_from(["kty", "crv", "x", "y", "n", "e", "alg"]), json_values),
       alg=st.sampled_from(["ES256", "RS256", "PS256", "EdDSA", "Ed25519", "ES512"]))  # fmt: skip
def test_garbage_jwk(jwk: dict[str, Any], alg: str) -> None:
    enc = lambda obj: b64encode(json.dumps(obj).encode())  # noqa: E731
    proof = f"{enc({'typ': 'dpop+jwt', 'alg': alg, 'jwk': jwk})}.{enc({'jti': 'a'})}.{b64encode(b'x' * 64)}"
    check(HARNESS, [("authorization", f"DPoP {TOKEN}"), ("dpop", proof)])


@settings(max_examples=200, deadline=None)
@given(position=st.integers(min_value=0), char=st.sampled_from("A_-.=x0"))
def test_mutated_valid_proof(position: int, char: str) -> None:
    proof = KEY.proof("GET", URL, access_token=TOKEN, iat=CLOCK.now)
    i = position % len(proof)
    check(
        HARNESS, [("authorization", f"DPoP {TOKEN}"), ("dpop", proof[:i] + char + proof[i + 1 :])]
    )


@settings(max_examples=150, deadline=None)
@given(host=st.text(max_size=40), path=st.text(max_size=40))
def test_arbitrary_host_and_path(host: str, path: str) -> None:
    proof = KEY.proof("GET", URL, access_token=TOKEN, iat=CLOCK.now)
    info = request("GET", URL, [("authorization", f"DPoP {TOKEN}"), ("dpop", proof)], host=host)
    info = type(info)(**{**{f: getattr(info, f) for f in info.__slots__}, "path": "/" + path})  # type: ignore[attr-defined]
    outcome = HARNESS.engine.run_sync(info, HARNESS.store)
    assert outcome.refusal is None or outcome.refusal.status in (400, 401)


# Members as (name, value) pairs, so that a name can repeat; rendered with json.dumps pieces and
# random spacing, the way another encoder (or an attacker) might write them.
def _render(node: Any, space: str) -> str:
    if isinstance(node, tuple) and node and node[0] == "object":
        members = [
            f"{json.dumps(name)}{space}:{space}{_render(value, space)}" for name, value in node[1]
        ]
        return "{" + f",{space}".join(members) + "}"
    if isinstance(node, tuple) and node and node[0] == "array":
        return "[" + ",".join(_render(item, space) for item in node[1]) + "]"
    return json.dumps(node)


def _has_duplicates(node: Any) -> bool:
    if isinstance(node, tuple) and node and node[0] == "object":
        names = [name for name, _ in node[1]]
        return len(names) != len(set(names)) or any(_has_duplicates(v) for _, v in node[1])
    if isinstance(node, tuple) and node and node[0] == "array":
        return any(_has_duplicates(item) for item in node[1])
    return False


json_trees = st.recursive(
    st.none() | st.integers() | st.text(alphabet='ab,:{}[]" ', max_size=6),
    lambda inner: (
        st.tuples(st.just("array"), st.lists(inner, max_size=3))
        | st.tuples(
            st.just("object"),
            st.lists(st.tuples(st.sampled_from(["a", "b", "a,", ","]), inner), max_size=4),
        )
    ),
    max_leaves=10,
)


@settings(max_examples=400, deadline=None)
@given(
    st.tuples(
        st.just("object"),
        st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), json_trees), max_size=5),
    ),
    st.sampled_from(["", " "]),
)
def test_duplicate_members_are_refused_at_any_depth(tree: Any, space: str) -> None:
    """jose.json_object_from's comma-count fast path must agree with the hooked decoder."""
    from dpop_middleware.core.jose import MalformedError, json_object_from

    text = _render(tree, space)
    try:
        json_object_from(text.encode())
        accepted = True
    except MalformedError:
        accepted = False
    assert accepted is not _has_duplicates(tree), text


# Hex digits around "%": "%f%42" must not normalise to "%fB" (which a second pass reads as %FB).
url_text = st.text(alphabet="aZ0149BF-._~%2Ef/:@!$&'()*+,;=?# é", max_size=30)


@settings(max_examples=400, deadline=None)
@given(
    scheme=st.sampled_from(["http", "https", "HTTPS"]),
    host=st.sampled_from(["api.example", "API.example:443", "[::1]:8080", "h_1:080", "x:80"]),
    root=st.sampled_from(["", "/v1", "/a%2e%2E"]),
    path=url_text,
)
def test_the_request_uri_is_a_fixed_point_of_normalisation(
    scheme: str, host: str, root: str, path: str
) -> None:
    """The verifier skips normalising an htu that equals the request URI as built: sound only if
    that URI is already normal, i.e. normalising it changes nothing."""
    from dpop_middleware.core.htu import normalize_uri, request_htu
    from dpop_middleware.core.request import RequestInfo
    from dpop_middleware.errors import DPoPError

    info = RequestInfo(
        method="GET",
        scheme=scheme,
        path="/" + path.replace("?", "%3F").replace("#", "%23"),
        headers=(("host", host),),
        root_path=root,
    )
    try:
        expected = request_htu(info, [host], None, ())
    except DPoPError:
        return  # a refused Host is never compared
    assert normalize_uri(expected) == expected
