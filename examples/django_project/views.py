"""Views read the verified result with ``dpop_result(request)`` (WSGI and ASGI alike)."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse

from dpop_middleware.django import dpop_result


def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})  # in exclude_paths: no DPoP needed


def me(request: HttpRequest) -> JsonResponse:
    result = dpop_result(request)
    if result is None:  # only when the middleware verified nothing (e.g. report_only mode)
        return JsonResponse({"error": "unauthorized"}, status=401)
    return JsonResponse(
        {
            "sub": result.subject,
            "scheme": result.scheme,
            "jkt": result.jkt,
            "scope": result.claims.get("scope"),
        }
    )
