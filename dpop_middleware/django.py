"""Django helpers: the middleware's settings from ``settings.py``, and the result in a view.

``wsgi.py``::

    application = DPoPWSGIMiddleware(get_wsgi_application(), settings=dpop_settings())

``asgi.py``::

    application = DPoPMiddleware(get_asgi_application(), settings=dpop_settings())

In views, :func:`dpop_result` reads the result; :func:`dpop_required` (function views) and
:class:`DPoPRequiredMixin` (class-based views) require it, with scopes, refusing exactly as the
middleware does (403 ``insufficient_scope``, or 401 when nothing was verified)::

    @dpop_required(scopes=["write"])
    def create(request): ...

    class Items(DPoPRequiredMixin, View):
        dpop_scopes = ("write",)

Django is imported only when :func:`dpop_settings` is called or a refusal is rendered, never when
this module or the package is imported.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar, cast

from dpop_middleware.core.verifier import DPoPResult, Refusal
from dpop_middleware.errors import ConfigurationError
from dpop_middleware.routes import (
    asgi_refusal,
    header_name,
    route_claims,
    route_scopes,
    sync_refusal,
)
from dpop_middleware.settings import ClaimRequirements

__all__ = [
    "DPoPRequiredMixin",
    "dpop_required",
    "dpop_result",
    "dpop_settings",
    "refusal_response",
]

View = TypeVar("View", bound=Callable[..., Any])


def dpop_settings(name: str = "DPOP") -> dict[str, Any]:
    """A copy of the settings dict in Django's ``settings.<name>`` (default ``settings.DPOP``).

    Call it after ``get_wsgi_application()`` / ``get_asgi_application()``, which configure Django.
    """
    settings = importlib.import_module("django.conf").settings
    value = getattr(settings, name, None)
    if not isinstance(value, Mapping):
        shown = "missing" if value is None else f"a {type(value).__name__}"
        raise ConfigurationError(
            f"dpop_middleware: Django setting {name!r} is {shown}; "
            "allowed: a dict of dpop_middleware settings"
        )
    return dict(value)


def dpop_result(request: Any) -> DPoPResult | None:
    """The verified result for a Django request (ASGI ``request.scope``, WSGI ``request.META``),
    or ``None`` when the middleware verified nothing (excluded path, preflight, report_only)."""
    scope = getattr(request, "scope", None)
    source = scope if isinstance(scope, Mapping) else getattr(request, "META", None)
    result = source.get("dpop") if isinstance(source, Mapping) else None
    return result if isinstance(result, DPoPResult) else None


def refusal_response(refusal: Refusal) -> Any:
    """The refusal as a Django ``HttpResponse`` (the headers the middleware sends)."""
    http_response = importlib.import_module("django.http").HttpResponse
    response = http_response(refusal.body, status=refusal.status)
    for name, value in refusal.headers:
        response[header_name(name)] = value
    return response


def _source(request: Any) -> Mapping[str, Any]:
    scope = getattr(request, "scope", None)
    if isinstance(scope, Mapping):
        return scope
    meta = getattr(request, "META", None)
    return meta if isinstance(meta, Mapping) else {}


def dpop_required(
    *, scopes: str | Iterable[str] = (), claims: Mapping[str, Any] | None = None
) -> Callable[[View], View]:
    """Require a verified token with every scope in ``scopes`` (and every claim value in
    ``claims``) on a Django function view (sync or async), refusing exactly as the middleware
    does: 403 ``insufficient_scope`` (a claim: 403 ``claim_mismatch``), or 401 when nothing was
    verified. Both are checked here, at start-up."""
    needed = route_scopes(scopes, "dpop_required(scopes=...)")
    required = route_claims(claims, "dpop_required(claims=...)")

    def decorate(view: View) -> View:
        if inspect.iscoroutinefunction(view):

            @functools.wraps(view)
            async def guarded_async(request: Any, *args: Any, **kwargs: Any) -> Any:
                refusal = await _refusal_async(request, needed, required)
                if refusal is not None:
                    return refusal_response(refusal)
                return await view(request, *args, **kwargs)

            return cast(View, guarded_async)

        @functools.wraps(view)
        def guarded(request: Any, *args: Any, **kwargs: Any) -> Any:
            refusal = sync_refusal(_source(request), needed, required)
            if refusal is not None:
                return refusal_response(refusal)
            return view(request, *args, **kwargs)

        return cast(View, guarded)

    return decorate


async def _refusal_async(
    request: Any, scopes: tuple[str, ...], claims: ClaimRequirements
) -> Refusal | None:
    source = _source(request)
    if "type" in source and "asgi" in source:
        return await asgi_refusal(source, scopes, claims)
    return sync_refusal(source, scopes, claims)


class DPoPRequiredMixin:
    """For class-based views: ``class Items(DPoPRequiredMixin, View): dpop_scopes = ("write",)``.

    Put it first among the bases, so it runs before the view's own ``dispatch``. Works for sync
    and async views."""

    #: The scopes every method of this view needs (empty: a verified token is enough).
    dpop_scopes: tuple[str, ...] | list[str] | str = ()
    #: Claim values every method of this view needs, e.g. ``{"tenant": "acme"}``.
    dpop_claims: Mapping[str, Any] | None = None
    _dpop_needed: tuple[str, ...] = ()
    _dpop_claims: ClaimRequirements = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Checked when the class is defined, at start-up, like every setting.
        cls._dpop_needed = route_scopes(cls.dpop_scopes, f"{cls.__name__}.dpop_scopes")
        cls._dpop_claims = route_claims(cls.dpop_claims, f"{cls.__name__}.dpop_claims")

    def dispatch(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        needed, claims = self._dpop_needed, self._dpop_claims
        parent = super().dispatch  # type: ignore[misc]
        if getattr(self, "view_is_async", False):

            async def run() -> Any:
                refusal = await _refusal_async(request, needed, claims)
                if refusal is not None:
                    return refusal_response(refusal)
                return await parent(request, *args, **kwargs)

            return run()
        refusal = sync_refusal(_source(request), needed, claims)
        if refusal is not None:
            return refusal_response(refusal)
        return parent(request, *args, **kwargs)
