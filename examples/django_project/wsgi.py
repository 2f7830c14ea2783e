"""WSGI entry point: ``.venv/bin/gunicorn examples.django_project.wsgi:application``."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

from dpop_middleware import DPoPWSGIMiddleware
from dpop_middleware.django import dpop_settings

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_project.settings")

application = DPoPWSGIMiddleware(get_wsgi_application(), settings=dpop_settings())
