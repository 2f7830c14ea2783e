"""What every benchmark shares: the sizes of a run, the client key and token, rows, Redis keys."""

from __future__ import annotations

import gc
import socket
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

#: The request every in-process row verifies (the HTTP rows use the server's own URL).
API = "https://api.example"
PATH = "/items"
URL = API + PATH


@dataclass(frozen=True)
class Plan:
    """How big a run is. ``rounds`` are timed; one extra untimed warm-up round comes first."""

    mode: str
    rounds: int
    verify_n: int  # raw ES256 verifies per round
    redis_n: int  # raw SET NX PX round trips per round
    warm_n: int  # core requests per round, warm caches
    cold_n: int  # core requests per round, new key and token each
    redis_core_n: int  # core requests per round, sync Redis store
    asgi_n: int  # ASGI requests per round
    asgi_concurrency: int
    http_rounds: int
    http_n: int  # HTTP requests per round per server
    http_warmup: int
    http_concurrency: int
    http_time_limit: float  # hard limit per load-generator run, seconds
    memory_entries: int


PLANS = {
    "full": Plan(
        "full", rounds=7, verify_n=4000, redis_n=4000, warm_n=4000, cold_n=400,
        redis_core_n=3000, asgi_n=3200, asgi_concurrency=64, http_rounds=5, http_n=3000,
        http_warmup=300, http_concurrency=8, http_time_limit=50.0, memory_entries=1_000_000,
    ),
    "quick": Plan(
        "quick", rounds=3, verify_n=400, redis_n=800, warm_n=400, cold_n=100,
        redis_core_n=400, asgi_n=640, asgi_concurrency=64, http_rounds=2, http_n=500,
        http_warmup=100, http_concurrency=8, http_time_limit=20.0, memory_entries=200_000,
    ),
    "smoke": Plan(
        "smoke", rounds=1, verify_n=20, redis_n=20, warm_n=20, cold_n=5,
        redis_core_n=20, asgi_n=128, asgi_concurrency=64, http_rounds=1, http_n=40,
        http_warmup=10, http_concurrency=8, http_time_limit=15.0, memory_entries=10_000,
    ),
}  # fmt: skip


class BenchmarkError(RuntimeError):
    """A row could not be measured (a refusal where a pass was expected, a server that died)."""


# --------------------------------------------------------------------------------------------
# samples and rows


@dataclass
class Samples:
    """One figure per timed round."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)


@dataclass
class Row:
    """One line of the table (and one key of the JSON ``rows``)."""

    name: str
    what: str
    value: float
    unit: str  # "us", "us CPU", "rps", "bytes"
    best: float | None = None  # the best round (min time, max rps), for diagnosis
    rounds: list[float] = field(default_factory=list)
    floor: str | None = None  # name of the row (or sum of rows) this one is divided by
    floor_value: float | None = None
    target: float | None = None  # the ratio (or, for bytes, the value) to stay at or below
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.floor_value is None or not self.floor_value:
            return None
        return self.value / self.floor_value

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        measured = self.ratio if self.floor_value is not None else self.value
        return measured is not None and measured <= self.target

    def as_json(self) -> dict[str, Any]:
        key = {"us": "us", "us CPU": "cpu_us", "rps": "rps", "bytes": "bytes_per_entry"}[self.unit]
        out: dict[str, Any] = {"what": self.what, key: round(self.value, 3)}
        if self.best is not None:
            out[f"best_{key}"] = round(self.best, 3)
        if self.rounds:
            out[f"rounds_{key}"] = [round(v, 3) for v in self.rounds]
        if self.floor is not None:
            out["floor"] = self.floor
            out["floor_us"] = None if self.floor_value is None else round(self.floor_value, 3)
            out["ratio"] = None if self.ratio is None else round(self.ratio, 4)
        if self.target is not None:
            out["target_ratio" if self.floor is not None else "target"] = self.target
            out["met"] = self.met
        out.update(self.extra)
        return out


def per_op_us(loop: Callable[[], int]) -> tuple[float, float]:
    """Run ``loop`` (it returns how many operations it did): wall and process CPU us per op."""
    gc.collect()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    count = loop()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return wall / count * 1e6, cpu / count * 1e6


# --------------------------------------------------------------------------------------------
# the client key and token every row uses


class Client:
    """The ES256 client key, its bound access token, and an issuer for cold-path tokens."""

    def __init__(self, audience: str = API) -> None:
        from dpop_middleware.testing import DPoPKey, TokenIssuer

        self.issuer = TokenIssuer(audience=audience)
        self.key = DPoPKey.generate("ES256")
        # Long enough for a full run; the token is verified once and then served from the cache.
        self.token = self.issuer.token(bound_to=self.key, lifetime=3600)

    def settings(self, **extra: Any) -> dict[str, Any]:
        return self.issuer.settings(**extra)

    def proofs(self, n: int, url: str = URL) -> list[str]:
        """``n`` fresh proofs (each may be used once), ``iat`` now."""
        return [self.key.proof("GET", url, access_token=self.token) for _ in range(n)]

    def cold(self, n: int, url: str = URL) -> list[tuple[str, str]]:
        """``n`` (token, proof) pairs, each from a new client key with a new token."""
        from dpop_middleware.testing import DPoPKey

        out = []
        for _ in range(n):
            key = DPoPKey.generate("ES256")
            token = self.issuer.token(bound_to=key, lifetime=3600)
            out.append((token, key.proof("GET", url, access_token=token)))
        return out


# --------------------------------------------------------------------------------------------
# Redis


def run_prefix() -> str:
    """A key prefix of this run's own (no braces: never a cluster hash tag)."""
    return f"dpop-bench:{uuid.uuid4().hex[:12]}:"


def redis_address(url: str) -> tuple[str, int, int]:
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise BenchmarkError(f"--redis-url must be a plain redis:// URL for the raw floor: {url}")
    db = int(parts.path.strip("/") or 0)
    return parts.hostname or "127.0.0.1", parts.port or 6379, db


def redis_connect(url: str) -> socket.socket:
    """A plain socket to Redis (``SELECT`` sent if the URL names a database other than 0)."""
    host, port, db = redis_address(url)
    try:
        sock = socket.create_connection((host, port), timeout=5)
    except OSError as exc:
        raise BenchmarkError(f"Redis at {host}:{port} does not answer: {exc}") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if db:
        digits = str(db).encode()
        sock.sendall(b"*2\r\n$6\r\nSELECT\r\n$%d\r\n%s\r\n" % (len(digits), digits))
        if sock.recv(64) != b"+OK\r\n":
            raise BenchmarkError(f"Redis refused SELECT {db}")
    return sock


def redis_info(url: str) -> str:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        info = client.info("server")
    except (redis.RedisError, OSError) as exc:
        raise BenchmarkError(f"Redis at {url} does not answer: {exc}") from exc
    finally:
        client.close()
    return f"redis {info.get('redis_version')}"


def redis_cleanup(url: str, prefix: str) -> int:
    """Delete every key of this run; returns how many there were."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=10)
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=prefix + "*", count=2000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += client.unlink(*batch)
                batch.clear()
        if batch:
            deleted += client.unlink(*batch)
    finally:
        client.close()
    return deleted
