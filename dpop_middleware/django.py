"""Django helpers: the middleware's settings from ``settings.py``, and the result in a view.

``wsgi.py``::

    application = DPoPWSGIMiddleware(get_wsgi_application(), settings=dpop_settings())

``asgi.py``::

    application = DPoPMiddleware(get_asgi_application(), settings=dpop_settings())

Django is imported only when :func:`dpop_settings` is called, never when this module or the
package is imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from dpop_middleware.core.verifier import DPoPResult
from dpop_middleware.errors import ConfigurationError

__all__ = ["dpop_result", "dpop_settings"]


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
