"""ASGI entry point: ``.venv/bin/uvicorn examples.django_project.asgi:application``."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

from dpop_middleware import DPoPMiddleware
from dpop_middleware.django import dpop_settings

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_project.settings")

application = DPoPMiddleware(get_asgi_application(), settings=dpop_settings())
