"""Deeply immutable claims (core/frozen.py): read-only dicts, arrays as tuples, JSON as before."""

from __future__ import annotations

import copy
import json
import pickle
from collections import OrderedDict
from types import MappingProxyType
from typing import Any

import pytest

from dpop_middleware.core.frozen import EMPTY, FrozenDict, freeze

CLAIMS = {
    "sub": "user-123",
    "exp": 1700000000,
    "scope": "read",
    "ok": True,
    "none": None,
    "aud": ["a", "b"],
    "realm_access": {"roles": ["reader", {"nested": [1.5, []]}]},
}


@pytest.mark.parametrize(
    ("value", "frozen"),
    [
        pytest.param(["a", ["b"]], ("a", ("b",)), id="list-of-lists"),
        pytest.param(("a", ["b"]), ("a", ("b",)), id="tuple-holding-a-list"),
        pytest.param({"a": [{"b": []}]}, {"a": ({"b": ()},)}, id="object-array-object"),
        pytest.param(OrderedDict(a=[1]), {"a": (1,)}, id="any-mapping"),
        pytest.param(MappingProxyType({"a": [1]}), {"a": (1,)}, id="mapping-proxy"),
        pytest.param({1, 2}, frozenset({1, 2}), id="set"),
        pytest.param("text", "text", id="string"),
        pytest.param(None, None, id="null"),
    ],
)
def test_freeze(value: Any, frozen: Any) -> None:
    result = freeze(value)
    assert result == frozen
    assert type(result) is type(frozen) or isinstance(result, FrozenDict)


def test_every_object_becomes_a_frozen_dict_and_every_array_a_tuple() -> None:
    def walk(value: Any) -> None:
        assert not isinstance(value, list | set) and type(value) is not dict
        if isinstance(value, dict):
            assert type(value) is FrozenDict
            for member in value.values():
                walk(member)
        elif isinstance(value, tuple):
            for member in value:
                walk(member)

    walk(freeze(CLAIMS))


def test_freezing_copies_and_leaves_the_original_alone() -> None:
    original = copy.deepcopy(CLAIMS)
    frozen = freeze(original)
    original["realm_access"]["roles"].append("admin")
    assert original != CLAIMS
    assert json.loads(json.dumps(frozen)) == CLAIMS


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda d: d.__setitem__("sub", "x"), id="set-item"),
        pytest.param(lambda d: d.__delitem__("sub"), id="del-item"),
        pytest.param(lambda d: d.pop("sub"), id="pop"),
        pytest.param(lambda d: d.pop("missing", None), id="pop-missing-with-default"),
        pytest.param(lambda d: d.popitem(), id="popitem"),
        pytest.param(lambda d: d.clear(), id="clear"),
        pytest.param(lambda d: d.update({"sub": "x"}), id="update"),
        pytest.param(lambda d: d.update(), id="update-nothing"),
        pytest.param(lambda d: d.setdefault("new", 1), id="setdefault"),
        pytest.param(lambda d: d.__ior__({"sub": "x"}), id="in-place-or"),
        pytest.param(lambda d: d.update(sub="x"), id="update-keywords"),
    ],
)
def test_every_mutating_method_raises_type_error(mutate: Any) -> None:
    frozen = freeze(CLAIMS)
    with pytest.raises(TypeError, match="read-only"):
        mutate(frozen)
    with pytest.raises(TypeError, match="read-only"):
        mutate(frozen["realm_access"]["roles"][1])  # an object inside an array inside an object
    assert json.loads(json.dumps(frozen)) == CLAIMS


def test_json_and_copies() -> None:
    frozen = freeze(CLAIMS)
    assert json.loads(json.dumps(frozen)) == CLAIMS
    assert json.dumps(EMPTY) == "{}"
    assert frozen == CLAIMS | {"aud": ("a", "b"), "realm_access": frozen["realm_access"]}
    # A mutable shallow copy, when an application wants one.
    for mutable in (dict(frozen), frozen.copy(), frozen | {}):
        assert type(mutable) is dict
        mutable["sub"] = "x"
    # Copies and pickles are frozen again (the default would rebuild through __setitem__).
    for again in (copy.copy(frozen), copy.deepcopy(frozen), pickle.loads(pickle.dumps(frozen))):
        assert type(again) is FrozenDict and again == frozen
        assert type(again["realm_access"]) is FrozenDict


def test_too_deep_or_cyclic_is_a_recursion_error() -> None:
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(RecursionError):
        freeze(deep)
    cycle: dict[str, Any] = {}
    cycle["self"] = cycle
    with pytest.raises(RecursionError):
        freeze(cycle)
