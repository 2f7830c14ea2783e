"""Django settings for the example: no database, no apps, one settings dict for the middleware."""

from __future__ import annotations

import os

from examples.local_issuer import SETTINGS as LOCAL_ISSUER_SETTINGS

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "[::1]", "testserver"]
ROOT_URLCONF = "examples.django_project.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
DATABASES: dict[str, object] = {}
USE_TZ = True

# Read by dpop_middleware.django.dpop_settings() in wsgi.py and asgi.py. In a real project:
# DPOP = {"issuer": "https://as.example", "audience": "https://api.example",
#         "jwks_uri": "https://as.example/jwks", "exclude_paths": ["/health"]}
DPOP = LOCAL_ISSUER_SETTINGS
