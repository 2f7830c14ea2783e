"""The in-process rows: the two floors, the core (memory warm, memory cold, sync Redis) and the
ASGI middleware under 64 concurrent requests.

They run interleaved, finely: one untimed warm-up round of each, then for every timed round each
row's work is cut into ``SLICES`` consecutive slices and the rows take turns slice by slice (in
reverse order every other round). A row and the floors it is divided by thus share the same
stretch of time at a granularity of a few tens of milliseconds: on a shared VM whose speed
swings by tens of percent from one second to the next, that is what keeps a ratio a ratio. Every
round verifies fresh proofs signed just before it (a proof can be used once, and its ``iat``
must be recent); only the loops over pre-built requests are timed.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import math
import secrets
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from benchmarks.common import (
    PATH,
    URL,
    BenchmarkError,
    Client,
    Plan,
    Samples,
    per_op_us,
    redis_connect,
)
from dpop_middleware.asgi import DPoPMiddleware
from dpop_middleware.core.request import RequestInfo
from dpop_middleware.flow import Engine, Outcome
from dpop_middleware.replay import create_sync_store
from dpop_middleware.replay.base import ReplayStore
from dpop_middleware.replay.memory import MemoryReplayStore
from dpop_middleware.settings import Settings

# Headers a real client sends besides the two DPoP ones (the core scans the header tuple).
_OTHER_HEADERS = (("user-agent", "dpop-bench/1"), ("accept", "*/*"))


def request_info(token: str, proof: str) -> RequestInfo:
    """What an adapter would build for ``GET https://api.example/items``."""
    return RequestInfo(
        method="GET",
        scheme="https",
        path=PATH,
        headers=(
            ("host", "api.example"),
            *_OTHER_HEADERS,
            ("authorization", f"DPoP {token}"),
            ("dpop", proof),
        ),
        client_ip="127.0.0.1",
    )


def asgi_scope(token: str, proof: str) -> dict[str, Any]:
    """An ASGI ``http`` scope as uvicorn builds it for the same request."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("api.example", 443),
        "client": ("127.0.0.1", 50000),
        "scheme": "https",
        "method": "GET",
        "root_path": "",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "headers": [
            (b"host", b"api.example"),
            *((k.encode(), v.encode()) for k, v in _OTHER_HEADERS),
            (b"authorization", f"DPoP {token}".encode()),
            (b"dpop", proof.encode()),
        ],
    }


def _refused(outcome: Outcome) -> str:
    refusal = outcome.refusal
    assert refusal is not None
    return f"{refusal.status} {refusal.error.error} reason={refusal.error.reason}"


class Bench:
    """One row. ``prepare()`` makes a round's inputs (untimed: fresh proofs, requests);
    ``execute()`` is the timed loop and returns how many operations it did; ``round()`` runs both
    and records wall and CPU time per operation."""

    name = ""
    wall_key, cpu_key = "us", "cpu_us"

    def __init__(self) -> None:
        self.samples: dict[str, Samples] = {}
        self.failures: list[str] = []

    #: False for a row whose work must run in one go (the ASGI rows: 64 requests in flight).
    sliceable = True

    def prepare(self) -> Any:
        return None

    def execute(self, work: Any) -> int:
        raise NotImplementedError

    def slices(self, work: Any, count: int) -> list[Any]:
        """``work`` cut into ``count`` consecutive parts (a sequence; see ``sliceable``)."""
        if not self.sliceable:
            return [work] + [None] * (count - 1)
        size = len(work)
        return [work[size * i // count : size * (i + 1) // count] for i in range(count)]

    def check_failures(self) -> None:
        if self.failures:
            first, count = self.failures[0], len(self.failures)
            self.failures.clear()
            raise BenchmarkError(f"{self.name}: {count} failed, the first: {first}")

    def record(self, wall_us: float, cpu_us: float) -> None:
        for key, value in ((self.wall_key, wall_us), (self.cpu_key, cpu_us)):
            self.samples.setdefault(key, Samples()).add(value)

    def round(self, *, record: bool = True) -> None:
        """One round on its own (the warm-up, and ``benchmarks.profile``)."""
        work = self.prepare()
        wall_us, cpu_us = per_op_us(lambda: self.execute(work))
        self.check_failures()
        if record:
            self.record(wall_us, cpu_us)

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# floors


class ES256Floor(Bench):
    """Raw ``cryptography`` ES256 verify of one proof: signature base64url-decoded, R||S turned
    into DER, the key loaded once (what any verifier must do at the least)."""

    name = "floor_es256_verify"

    def __init__(self, client: Client, n: int) -> None:
        super().__init__()
        self.n = n
        proof = client.proofs(1)[0]
        header, payload, self.signature = proof.split(".")
        self.signing_input = f"{header}.{payload}".encode("ascii")
        jwk = client.key.public_jwk
        x, y = (base64.urlsafe_b64decode(jwk[c] + "=" * (-len(jwk[c]) % 4)) for c in "xy")
        self.key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + x + y)
        self.algorithm = ec.ECDSA(hashes.SHA256())

    def prepare(self) -> range:
        return range(self.n)

    def execute(self, work: range) -> int:
        one = self.execute_one
        for _ in work:
            one()
        return len(work)

    def execute_one(self) -> None:
        segment = self.signature
        sig = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        self.key.verify(der, self.signing_input, self.algorithm)  # InvalidSignature if wrong


class RedisFloor(Bench):
    """Raw ``SET <key> 1 NX PX <ttl>``: hand-encoded RESP over one plain socket, reply read."""

    name = "floor_redis_set_nx_px"

    def __init__(self, url: str, prefix: str, n: int, ttl: float) -> None:
        super().__init__()
        self.n = n
        self.prefix = f"{prefix}floor:".encode()
        px = str(math.ceil(ttl * 1000)).encode()
        self.tail = b"\r\n$1\r\n1\r\n$2\r\nNX\r\n$2\r\nPX\r\n$%d\r\n%s\r\n" % (len(px), px)
        self.sock = redis_connect(url)

    def prepare(self) -> list[bytes]:
        # Keys as long as the store's (prefix + 64 hex digits), each used once.
        return [self.prefix + secrets.token_hex(32).encode() for _ in range(self.n)]

    def execute(self, work: list[bytes]) -> int:
        one = self.execute_one
        for key in work:
            one(key)
        return len(work)

    def execute_one(self, key: bytes) -> None:
        sock = self.sock
        sock.sendall(b"*6\r\n$3\r\nSET\r\n$%d\r\n%s%s" % (len(key), key, self.tail))
        reply = sock.recv(64)
        while not reply.endswith(b"\r\n"):
            reply += sock.recv(64)
        if reply != b"+OK\r\n":
            self.failures.append(f"Redis answered {reply!r} to SET NX")

    def close(self) -> None:
        self.sock.close()


class SequenceFloor(Bench):
    """The two floors one after the other per request (verify, then SET NX PX), as a verifier
    does them: for diagnosis only. On a VM a round trip issued after ~65 us of CPU work can
    cost more than one in a tight loop (the Redis side has gone idle in between)."""

    name = "floor_verify_then_redis"

    def __init__(self, verify: ES256Floor, redis: RedisFloor) -> None:
        super().__init__()
        self.verify = verify
        self.redis = redis  # its socket too: rounds never overlap

    def prepare(self) -> list[bytes]:
        return [self.redis.prefix + secrets.token_hex(32).encode() for _ in range(self.verify.n)]

    def execute(self, work: list[bytes]) -> int:
        verify, redis = self.verify.execute_one, self.redis.execute_one
        for key in work:
            verify()
            redis(key)
        self.failures += self.redis.failures
        self.redis.failures.clear()
        return len(work)


# --------------------------------------------------------------------------------------------
# the core


class CoreBench(Bench):
    """``Engine.run_sync`` over pre-built ``RequestInfo`` objects, one fresh proof each."""

    def __init__(
        self,
        name: str,
        client: Client,
        n: int,
        store: ReplayStore,
        settings: Settings,
        *,
        cold: bool = False,
    ) -> None:
        super().__init__()
        self.name = name
        self.client = client
        self.n = n
        self.store = store
        self.engine = Engine(settings)
        self.cold = cold

    def prepare(self) -> list[RequestInfo]:
        if self.cold:
            return [request_info(token, proof) for token, proof in self.client.cold(self.n)]
        return [request_info(self.client.token, proof) for proof in self.client.proofs(self.n)]

    def execute(self, work: list[RequestInfo]) -> int:
        run, store, failures = self.engine.run_sync, self.store, self.failures
        for request in work:
            outcome = run(request, store)
            if outcome.refusal is not None:
                failures.append(_refused(outcome))
        return len(work)

    def close(self) -> None:
        self.store.close()


class IntrospectionBench(CoreBench):
    """``Engine.run_sync`` with opaque tokens checked by RFC 7662 introspection against the
    test kit's authorization server on loopback (a real HTTP server in a thread). Warm: one
    token, its answer cached; ``miss``: a new token every request, so one call each."""

    def __init__(self, name: str, client: Client, n: int, *, miss: bool = False) -> None:
        from dpop_middleware.testing import TokenIssuer

        self.kit = TokenIssuer(audience=client.issuer.audience)
        self.server = self.kit.serve().__enter__()
        intro = {
            "client_id": "client-abc",
            "client_secret": "secret-abc",
            "endpoint": self.server.introspection_endpoint,
            "cache_ttl": 3600,
        }
        settings = Settings.from_dict(
            self.server.introspection_settings(jwks=self.kit.jwks, introspection=intro)
        )
        super().__init__(name, client, n, MemoryReplayStore(), settings)
        self.miss = miss
        self.opaque = self.kit.opaque_token(bound_to=client.key, lifetime=3600)

    def prepare(self) -> list[RequestInfo]:
        key = self.client.key
        if self.miss:
            tokens = [self.kit.opaque_token(bound_to=key, lifetime=3600) for _ in range(self.n)]
        else:
            tokens = [self.opaque] * self.n
        return [
            request_info(token, key.proof("GET", URL, access_token=token)) for token in tokens
        ]

    def close(self) -> None:
        super().close()
        self.server.__exit__(None, None, None)


# --------------------------------------------------------------------------------------------
# ASGI in-process


async def _inner_app(scope: Any, receive: Any, send: Any) -> None:
    await send({
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": b"ok"})


class ASGIBench(Bench):
    """``DPoPMiddleware`` around a minimal app, called directly (no server), ``concurrency``
    requests in flight (``asyncio.gather`` of that many workers sharing the request list).
    Recorded: process CPU time per request (``cpu_us``) and wall time per request (``wall_us``).
    """

    wall_key = "wall_us"
    sliceable = False  # a slice would not keep 64 requests in flight

    def __init__(
        self, name: str, client: Client, n: int, concurrency: int, settings: dict[str, Any]
    ) -> None:
        super().__init__()
        self.name = name
        self.client = client
        self.n = n
        self.concurrency = concurrency
        self.middleware = DPoPMiddleware(_inner_app, settings=settings)
        # One loop for every round: the async Redis client belongs to the loop that first used it.
        self.loop = asyncio.new_event_loop()

    async def _drive(self, scopes: list[dict[str, Any]]) -> None:
        app, failures = self.middleware, self.failures
        pending = iter(scopes)
        body = {"type": "http.request", "body": b"", "more_body": False}

        async def receive() -> dict[str, Any]:
            return body

        async def send(message: Any) -> None:
            if message["type"] == "http.response.start" and message["status"] != 200:
                failures.append(f"status {message['status']}")

        async def worker() -> None:
            for scope in pending:
                await app(scope, receive, send)

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))

    def prepare(self) -> list[dict[str, Any]]:
        return [asgi_scope(self.client.token, proof) for proof in self.client.proofs(self.n)]

    def execute(self, work: list[dict[str, Any]]) -> int:
        self.loop.run_until_complete(self._drive(work))
        return len(work)

    def close(self) -> None:
        loop = self.loop
        # Requests left in flight by an interrupted round: cancel them before closing the store,
        # quietly (the interruption itself is reported by the caller).
        loop.set_exception_handler(lambda loop, context: None)
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:
            task.cancel()
        try:
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(self.middleware.store.aclose())
        finally:
            loop.close()


# --------------------------------------------------------------------------------------------


def build(plan: Plan, client: Client, redis_url: str, prefix: str, groups: set[str]) -> list[Bench]:
    """The in-process benches of ``groups`` (floors always)."""
    redis_store = {"url": redis_url, "key_prefix": prefix}
    ttl = Settings.from_dict(client.settings()).replay_ttl
    verify = ES256Floor(client, plan.verify_n)
    redis_floor = RedisFloor(redis_url, prefix, plan.redis_n, ttl)
    benches: list[Bench] = [verify, redis_floor, SequenceFloor(verify, redis_floor)]
    if "core" in groups:
        memory = Settings.from_dict(client.settings())
        redis = Settings.from_dict(client.settings(replay_store=redis_store))
        benches += [
            CoreBench("core_memory_warm", client, plan.warm_n, MemoryReplayStore(), memory),
            # Right after the warm row: each slice of theirs runs next to one of its own.
            *observed_cores(client, plan),
            CoreBench(
                "core_memory_cold", client, plan.cold_n, MemoryReplayStore(), memory, cold=True
            ),
            CoreBench(
                "core_redis_sync_warm",
                client,
                plan.redis_core_n,
                create_sync_store(redis.replay_store),
                redis,
            ),
            IntrospectionBench("core_introspection_warm", client, plan.warm_n),
            IntrospectionBench("core_introspection_miss", client, plan.cold_n, miss=True),
        ]
    if "asgi" in groups:
        conc = plan.asgi_concurrency
        benches += [
            ASGIBench(
                f"asgi_redis_async_{conc}",
                client,
                plan.asgi_n,
                conc,
                client.settings(replay_store=redis_store),
            ),
            ASGIBench(f"asgi_memory_{conc}", client, plan.asgi_n, conc, client.settings()),
        ]
    return benches


def observed_cores(client: Client, plan: Plan) -> list[Bench]:
    """The warm core with observers on (issue 17): Prometheus metrics on a registry of their
    own; tracing with the API's no-op provider; tracing with the SDK's provider (spans made,
    attributes set and ended, no exporter: what an exporter costs is its own business)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import NoOpTracerProvider
    from prometheus_client import CollectorRegistry

    variants = {
        "core_memory_warm_metrics": {"metrics": {"registry": CollectorRegistry()}},
        "core_memory_warm_tracing_noop": {"tracing": {"tracer_provider": NoOpTracerProvider()}},
        "core_memory_warm_tracing_sdk": {"tracing": {"tracer_provider": TracerProvider()}},
    }
    return [
        CoreBench(
            name,
            client,
            plan.warm_n,
            MemoryReplayStore(),
            Settings.from_dict(client.settings(**extra)),
        )
        for name, extra in variants.items()
    ]


#: Slices per timed round (see the module docstring).
SLICES = 8


def run_interleaved(
    benches: list[Bench], rounds: int, progress: Callable[[str], None], slices: int = SLICES
) -> dict[str, dict[str, Samples]]:
    """One warm-up round of each bench, then ``rounds`` timed rounds, interleaved slice by slice."""
    for bench in benches:
        bench.round(record=False)
    for index in range(rounds):
        progress(f"in-process round {index + 1}/{rounds}")
        order = benches if index % 2 == 0 else benches[::-1]
        parts = [bench.slices(bench.prepare(), slices) for bench in order]
        wall = [0.0] * len(order)
        cpu = [0.0] * len(order)
        ops = [0] * len(order)
        gc.collect()
        for part in range(slices):
            for i, bench in enumerate(order):
                work = parts[i][part]
                if work is None:
                    continue
                wall0, cpu0 = time.perf_counter(), time.process_time()
                done = bench.execute(work)
                spent_wall, spent_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
                ops[i] += done
                wall[i] += spent_wall
                cpu[i] += spent_cpu
                if done:  # per slice too: rows compared slice by slice (cli.observed_rows)
                    samples = bench.samples
                    samples.setdefault("slice_us", Samples()).add(spent_wall / done * 1e6)
                    samples.setdefault("slice_cpu_us", Samples()).add(spent_cpu / done * 1e6)
        for i, bench in enumerate(order):
            bench.check_failures()
            bench.record(wall[i] / ops[i] * 1e6, cpu[i] / ops[i] * 1e6)
    return {bench.name: bench.samples for bench in benches}
