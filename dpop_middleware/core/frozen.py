"""Deeply immutable claims: what every request with the same token is handed.

The verified-token cache holds the claims, and each request's application gets them. Freezing
them once, when the token is verified, is cheaper than a deep copy per request: objects become
:class:`FrozenDict` (a ``dict`` subclass, so ``json.dumps`` and the frameworks' JSON responses
take it as it is) and arrays become tuples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

#: The JSON scalar types: nothing in them to freeze.
_SCALARS = frozenset({str, int, float, bool, type(None)})


class FrozenDict(dict[str, Any]):
    """A read-only ``dict``: every mutating method raises TypeError.

    ``dict(frozen)`` or ``frozen.copy()`` is a plain, mutable, shallow copy. Copying and pickling
    give a FrozenDict again.
    """

    __slots__ = ()

    def _read_only(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("the claims are read-only; dict(claims) is a mutable copy")

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __reduce__(self) -> tuple[Any, ...]:
        # The default rebuilds a dict subclass item by item through __setitem__.
        return (FrozenDict, (dict(self),))

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(self)})"


EMPTY = FrozenDict()


def freeze(value: Any) -> Any:
    """``value`` with every mapping made a :class:`FrozenDict` and every list or tuple a tuple,
    a set a frozenset, at any depth; anything else is kept as it is (JSON has nothing else).

    Recursive: RecursionError for a value nested past the interpreter's limit (or a cycle).
    """
    kind = type(value)
    scalars = _SCALARS
    if kind in scalars:
        return value
    if kind is dict or isinstance(value, Mapping):  # the ABC check costs more than the copy
        frozen = FrozenDict(value)  # a shallow copy in C; most claims are scalars
        for name, member in value.items():
            if type(member) not in scalars:
                dict.__setitem__(frozen, name, freeze(member))
        return frozen
    if isinstance(value, list | tuple):
        return tuple([freeze(member) for member in value])
    if isinstance(value, set):
        return frozenset(value)  # its members are hashable, hence not lists or dicts
    return value
