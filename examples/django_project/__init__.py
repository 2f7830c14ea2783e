"""A minimal Django project behind the DPoP middleware, WSGI or ASGI (no manage.py needed).

Run (WSGI):  .venv/bin/gunicorn examples.django_project.wsgi:application
Run (ASGI):  .venv/bin/uvicorn examples.django_project.asgi:application
Call:        .venv/bin/python -m examples.client http://127.0.0.1:8000/me
"""
