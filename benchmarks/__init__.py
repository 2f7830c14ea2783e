"""Benchmarks: what DPoP verification costs, measured against the floors it cannot go below.

Run ``python -m benchmarks`` from the repository root (``python3 tasks.py bench``); ``--quick``
finishes in under a minute, ``--smoke`` in seconds (tiny sizes: only proves that every row runs),
``--json FILE`` writes the figures. The rows, all for the same ES256 client key and access token:

* floors: a raw ``cryptography`` ES256 verify of a proof (base64url signature decode and R||S to
  DER included) and a raw Redis ``SET NX PX`` round trip over a plain socket;
* the core (``Engine.run_sync``) with the memory store, warm and cold, and with the sync Redis store;
* the ASGI middleware in-process, 64 concurrent requests, async Redis (CPU per request);
* end to end over loopback HTTP: Starlette/uvicorn and Flask/gunicorn, with and without the
  middleware, driven by a separate load-generator process;
* bytes per live entry of the memory replay store.

This package imports nothing at import time: ``python -m benchmarks.loadgen`` (the load generator)
must start fast and use the standard library only.
"""
