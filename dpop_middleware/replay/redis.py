"""Redis replay store: one atomic ``SET <prefix><key> 1 NX PX <ttl>`` per request.

RFC 9449 section 11.1: to detect a replayed proof, the server remembers each proof's ``jti`` for
the time window in which that proof would be accepted. When several workers serve one API they
must share that memory, and Redis is the shared memory. ``SET ... NX PX`` decides and records in a single command, so two workers
racing on one proof cannot both see "first use" (no read-then-write, no script).

Keys are ``key_prefix`` + the hex of the verifier's 32-byte replay key (BLAKE2b-256 over the
key thumbprint and ``jti``): uniformly spread over Redis Cluster slots, and ``key_prefix`` may
not contain ``{`` or ``}`` so it can never become a hash tag that pins every key to one slot.

Fail closed: every Redis error or timeout (indeed any exception the client raises) becomes :class:`~dpop_middleware.errors.ReplayStoreError`
(the engine answers 503 with ``Retry-After``). Clients built here make exactly one attempt per
request (redis-py's default retries with back-off would hold a request far past ``timeout``), live
one per process (rebuilt after a fork, so workers never share a socket) and, for the async store,
one per event loop. Nothing is remembered about a failure, so requests pass again as soon as
Redis answers.

With Sentinel, stores built here follow failovers (:mod:`dpop_middleware.replay.failover`):
they refuse from the first sign of a failover until the new master is in place, then reconnect,
so no write lands on a master that is losing its role.

This is the only module that imports ``redis``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import difflib
import functools
import logging
import math
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from dpop_middleware.errors import ConfigurationError, ReplayStoreError
from dpop_middleware.logfields import log_extra
from dpop_middleware.replay.failover import FailoverWatch

if TYPE_CHECKING:
    from dpop_middleware.replay import ReplayStoreConfig

__all__ = [
    "DEFAULTS",
    "AsyncRedisReplayStore",
    "RedisReplayStore",
    "px_for",
    "redact_url",
    "validate_redis_options",
]

logger = logging.getLogger("dpop_middleware")

SyncClient = redis.Redis | redis.cluster.RedisCluster
AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster
#: Build a client; also returns the helper clients to close with it (a Sentinel's own clients).
SyncConnect = Callable[[], tuple[SyncClient, tuple[redis.Redis, ...]]]
AsyncConnect = Callable[[], tuple[AsyncClient, tuple[redis.asyncio.Redis, ...]]]

#: Every key of the ``replay_store`` dict with its default. ``url`` is required unless ``client``
#: (an application's own client object) is given; ``client`` takes only ``key_prefix`` beside it.
DEFAULTS: Mapping[str, Any] = {
    "url": None,
    "key_prefix": "dpop:",
    "cluster": False,
    "timeout": 0.5,
    "ping_on_startup": False,
    "sentinels": None,
    "sentinel_password": None,
    "client": None,
}
_CLIENT_KEYS = frozenset({"client", "key_prefix"})
_MAX_TIMEOUT = 60.0
_MAX_PX = 2**62

_URL_FORMS = (
    "redis://[[user]:password@]host[:port][/db], rediss://... (TLS) or "
    "unix://[[user]:password@]/path/to/redis.sock[?db=N]"
)
_TLS_QUERY = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")
_CERT_REQS = ("none", "optional", "required")
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}

#: What a Redis call may raise: redis-py's own errors (connection, timeout, response, cluster)
#: and the socket errors it may let through.
_REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError)


# --------------------------------------------------------------------------------------------
# settings


def redact_url(url: str) -> str:
    """``url`` with its password (user info or ``password=`` query) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}{':***' if colon else ''}@{hostport}"
    query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _shown(key: str, value: Any) -> str:
    if key == "url" and isinstance(value, str):
        return repr(redact_url(value))
    if key == "sentinel_password":
        return "<hidden>"
    return repr(value)


def _bad(key: str, value: Any, allowed: str, problem: str = "") -> ConfigurationError:
    why = f" ({problem})" if problem else ""
    return ConfigurationError(
        f"dpop_middleware setting 'replay_store' key {key!r}: got {_shown(key, value)}{why}; "
        f"allowed: {allowed}"
    )


@dataclass(frozen=True, slots=True)
class _Endpoint:
    """Where a Redis URL points, as redis-py connection keyword arguments."""

    kwargs: Mapping[str, Any]  # host/port or unix_socket_path, db, username, password, ssl_*
    host: str | None  # the TCP host; with Sentinel, the service name


def _parse_url(url: Any, *, sentinel: bool = False) -> _Endpoint:
    """Parse and check a ``redis://``, ``rediss://`` or ``unix://`` URL (ConfigurationError)."""
    if not isinstance(url, str):
        raise _bad("url", url, _URL_FORMS)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _bad("url", url, _URL_FORMS, "malformed URL or port") from None
    if port == 0:
        raise _bad("url", url, _URL_FORMS, "port 0")
    scheme = parts.scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise _bad("url", url, _URL_FORMS, f"unsupported scheme {scheme!r}")
    if parts.fragment:
        raise _bad("url", url, _URL_FORMS, "a URL fragment is not allowed")
    allowed_query = ("db", "password", *(_TLS_QUERY if scheme == "rediss" else ()))
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise _bad("url", url, _URL_FORMS, "malformed query string") from None
    for name, values in query.items():
        if name not in allowed_query:
            raise _bad(
                "url", url, f"query parameters {', '.join(allowed_query)}",
                f"unknown query parameter {name!r}",
            )  # fmt: skip
        if len(values) != 1:
            raise _bad("url", url, _URL_FORMS, f"query parameter {name!r} given twice")
    params = {name: values[0] for name, values in query.items()}

    kwargs: dict[str, Any] = {}
    if parts.username:
        kwargs["username"] = unquote(parts.username)
    password = unquote(parts.password) if parts.password else params.get("password")
    if password:
        kwargs["password"] = password

    db_text = params.get("db")
    host: str | None = None
    if scheme == "unix":
        if parts.hostname or port is not None:
            raise _bad(
                "url", url, _URL_FORMS,
                "a unix:// URL takes no host: write unix:///absolute/path/to/redis.sock",
            )  # fmt: skip
        if not parts.path or parts.path == "/":
            raise _bad("url", url, _URL_FORMS, "the socket path is missing")
        kwargs["unix_socket_path"] = unquote(parts.path)
    else:
        host = unquote(parts.hostname) if parts.hostname else None
        if not host:
            raise _bad("url", url, _URL_FORMS, "the host is missing")
        if sentinel:
            if port is not None:
                raise _bad(
                    "url", url, "redis://[[user]:password@]service_name[/db]",
                    "with 'sentinels' the URL's host is the Sentinel service name and takes no "
                    "port",
                )  # fmt: skip
        else:
            kwargs["host"] = host
            kwargs["port"] = 6379 if port is None else port
        path = parts.path.strip("/")
        if path:
            if db_text is not None:
                raise _bad("url", url, _URL_FORMS, "the db is given twice (path and ?db=)")
            db_text = path
        if scheme == "rediss":
            kwargs.update(_tls_options(url, params))
    if db_text is not None:
        if not (db_text.isascii() and db_text.isdigit()):
            raise _bad("url", url, _URL_FORMS, f"db must be a whole number >= 0, got {db_text!r}")
        kwargs["db"] = int(db_text)
    return _Endpoint(kwargs, host)


def _tls_options(url: str, params: Mapping[str, str]) -> dict[str, Any]:
    tls: dict[str, Any] = {"ssl": True}
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if name in params:
            tls[name] = params[name]
    if "ssl_cert_reqs" in params:
        if params["ssl_cert_reqs"] not in _CERT_REQS:
            raise _bad("url", url, f"ssl_cert_reqs one of {', '.join(_CERT_REQS)}")
        tls["ssl_cert_reqs"] = params["ssl_cert_reqs"]
    if "ssl_check_hostname" in params:
        flag = _BOOLS.get(params["ssl_check_hostname"].lower())
        if flag is None:
            raise _bad("url", url, "ssl_check_hostname=true or false")
        tls["ssl_check_hostname"] = flag
    return tls


def _sentinel_nodes(value: Any) -> tuple[tuple[str, int], ...]:
    allowed = "a non-empty list of 'host:port' strings or (host, port) pairs"
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or not value:
        raise _bad("sentinels", value, allowed)
    nodes = []
    for entry in value:
        if isinstance(entry, str):
            host, colon, port_text = entry.rpartition(":")
            if not colon or not (port_text.isascii() and port_text.isdigit()):
                raise _bad("sentinels", value, allowed, f"{entry!r} has no port")
            host, port = host.strip("[]"), int(port_text)
        elif (
            isinstance(entry, Sequence)
            and len(entry) == 2
            and isinstance(entry[0], str)
            and isinstance(entry[1], int)
            and not isinstance(entry[1], bool)
        ):
            host, port = entry[0], entry[1]
        else:
            raise _bad("sentinels", value, allowed, f"bad entry {entry!r}")
        if not host or not 0 < port < 65536:
            raise _bad("sentinels", value, allowed, f"bad entry {entry!r}")
        nodes.append((host, port))
    return tuple(nodes)


def _is_client(value: Any) -> bool:
    return isinstance(
        value,
        redis.Redis
        | redis.cluster.RedisCluster
        | redis.asyncio.Redis
        | redis.asyncio.cluster.RedisCluster,
    )


def validate_redis_options(value: Mapping[str, Any]) -> dict[str, Any]:
    """Check a Redis ``replay_store`` dict (``{"url": ...}`` or ``{"client": ...}``) once, at
    start-up; the result has every key, with defaults filled in. Raises ConfigurationError
    naming the key, the value and what is allowed; unknown keys are an error."""
    unknown = sorted(set(value) - set(DEFAULTS), key=str)
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(str(name), list(DEFAULTS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigurationError(
            f"dpop_middleware setting 'replay_store': unknown key {name!r}{hint}; "
            f"allowed keys: {', '.join(DEFAULTS)}"
        )
    options = {**DEFAULTS, **value}

    prefix = options["key_prefix"]
    if not isinstance(prefix, str) or "{" in prefix or "}" in prefix or len(prefix) > 200:
        raise _bad(
            "key_prefix", prefix,
            "a string of at most 200 characters without '{' or '}' (a hash tag would put every "
            "key in one cluster slot), e.g. 'dpop:'",
        )  # fmt: skip

    if options["client"] is not None:
        if not _is_client(options["client"]):
            raise _bad(
                "client", options["client"],
                "a redis.Redis, redis.RedisCluster, redis.asyncio.Redis or "
                "redis.asyncio.RedisCluster (for Sentinel: sentinel.master_for(name))",
            )  # fmt: skip
        extra = sorted(k for k in value if k not in _CLIENT_KEYS)
        if extra:
            raise _bad(
                extra[0], value[extra[0]],
                "only 'key_prefix' beside 'client' (configure timeouts, TLS and pools on the "
                "client itself)",
            )  # fmt: skip
        return options

    for key in ("cluster", "ping_on_startup"):
        if not isinstance(options[key], bool):
            raise _bad(key, options[key], "True or False")
    timeout = options["timeout"]
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout <= _MAX_TIMEOUT
    ):
        raise _bad("timeout", timeout, f"a number of seconds > 0 and <= {_MAX_TIMEOUT:g}")
    options["timeout"] = float(timeout)

    password = options["sentinel_password"]
    if password is not None and not isinstance(password, str):
        raise _bad("sentinel_password", password, "a string or None")
    sentinel = options["sentinels"] is not None
    if sentinel:
        options["sentinels"] = _sentinel_nodes(options["sentinels"])
        if options["cluster"]:
            raise _bad("sentinels", value["sentinels"], "either 'sentinels' or 'cluster', not both")
    elif password is not None:
        raise _bad("sentinel_password", password, "only together with 'sentinels'")

    url = options["url"]
    if url is None:
        raise _bad("url", url, _URL_FORMS, "'url' (or 'client') is required")
    endpoint = _parse_url(url, sentinel=sentinel)
    if options["cluster"]:
        if "unix_socket_path" in endpoint.kwargs:
            raise _bad("url", url, "redis:// or rediss:// with 'cluster'")
        if endpoint.kwargs.get("db", 0) != 0:
            raise _bad("url", url, "db 0 only with 'cluster' (Redis Cluster has one database)")
    if sentinel and "unix_socket_path" in endpoint.kwargs:
        raise _bad("url", url, "redis://[[user]:password@]service_name[/db] with 'sentinels'")
    return options


# --------------------------------------------------------------------------------------------
# building clients


def _describe(options: Mapping[str, Any]) -> str:
    client = options.get("client")
    if client is not None:
        return f"client {type(client).__module__}.{type(client).__qualname__}"
    url = redact_url(options["url"])
    if options["cluster"]:
        return f"cluster {url}"
    if options["sentinels"]:
        nodes = ",".join(f"{host}:{port}" for host, port in options["sentinels"])
        return f"sentinel {url} via {nodes}"
    return url


def _timeouts(options: Mapping[str, Any]) -> dict[str, float]:
    return {"socket_timeout": options["timeout"], "socket_connect_timeout": options["timeout"]}


def _sentinel_kwargs(options: Mapping[str, Any], retry: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {**_timeouts(options), "retry": retry}
    if options["sentinel_password"] is not None:
        kwargs["password"] = options["sentinel_password"]
    return kwargs


def _sync_connect(options: Mapping[str, Any]) -> SyncConnect:
    """A function that builds a fresh sync client for these (validated) options."""
    endpoint = _parse_url(options["url"], sentinel=options["sentinels"] is not None)
    kwargs = {**endpoint.kwargs, **_timeouts(options)}
    service = endpoint.host or ""

    def connect() -> tuple[SyncClient, tuple[redis.Redis, ...]]:
        retry = Retry(NoBackoff(), 0)
        if options["cluster"]:
            return redis.cluster.RedisCluster(retry=retry, **kwargs), ()
        # RESP2: the one-line replies _set_nx_on reads, and no RESP3 push frames in between.
        if options["sentinels"]:
            sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
                list(options["sentinels"]),
                sentinel_kwargs=_sentinel_kwargs(options, Retry(NoBackoff(), 0)),
                retry=retry,
                protocol=2,
                **kwargs,
            )
            client: redis.Redis = sentinel.master_for(service)  # type: ignore[no-untyped-call]
            return client, tuple(sentinel.sentinels)
        return redis.Redis(retry=retry, protocol=2, **kwargs), ()

    return connect


def _async_connect(options: Mapping[str, Any]) -> AsyncConnect:
    """A function that builds a fresh async client (connections are opened on first use)."""
    endpoint = _parse_url(options["url"], sentinel=options["sentinels"] is not None)
    kwargs = {**endpoint.kwargs, **_timeouts(options)}
    service = endpoint.host or ""

    def connect() -> tuple[AsyncClient, tuple[redis.asyncio.Redis, ...]]:
        retry = AsyncRetry(NoBackoff(), 0)
        if options["cluster"]:
            return redis.asyncio.cluster.RedisCluster(retry=retry, **kwargs), ()
        if options["sentinels"]:
            sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
                list(options["sentinels"]),
                sentinel_kwargs=_sentinel_kwargs(options, AsyncRetry(NoBackoff(), 0)),
                retry=retry,
                **kwargs,
            )
            client: redis.asyncio.Redis = sentinel.master_for(service)
            return client, tuple(sentinel.sentinels)
        return redis.asyncio.Redis(retry=retry, **kwargs), ()

    return connect


def _failover_watch(options: Mapping[str, Any]) -> FailoverWatch | None:
    """A watch on the Sentinels of this service (None without ``sentinels``)."""
    if not options["sentinels"]:
        return None
    service = _parse_url(options["url"], sentinel=True).host or ""

    def connect(host: str, port: int) -> redis.Redis:
        kwargs = _sentinel_kwargs(options, Retry(NoBackoff(), 0))
        return redis.Redis(host=host, port=port, protocol=2, **kwargs)

    return FailoverWatch(service, options["sentinels"], connect, timeout=options["timeout"])


class FailoverRefusal(Exception):
    """Writes are refused while a Sentinel failover is under way (see :mod:`.failover`)."""


def _wrong_master(conn: Any, watch: FailoverWatch) -> str | None:
    """Why ``conn`` (a Sentinel-managed connection, connected) must not be written to: it is
    not connected to the master the watch announced. redis-py asks whichever Sentinel answers
    first; one that has not seen the switch yet names the old master."""
    want = watch.address
    have = (getattr(conn, "host", None), getattr(conn, "port", None))
    if want is None or have == want:
        return None
    return (
        f"connected to {have[0]}:{have[1]}, but Sentinel announced the master at "
        f"{want[0]}:{want[1]}"
    )


def _close_sync(client: SyncClient | None, extras: Sequence[redis.Redis]) -> None:
    for each in (client, *extras):
        if each is not None:
            each.close()


def _ping_on_startup(
    connect: SyncConnect, where: str
) -> tuple[SyncClient, tuple[redis.Redis, ...]]:
    """PING once (``ping_on_startup``); a failure stops start-up with ReplayStoreError."""
    built: tuple[SyncClient, tuple[redis.Redis, ...]] | None = None
    try:
        built = connect()
        built[0].ping()
    except _REDIS_ERRORS as exc:
        if built is not None:
            _close_sync(*built)
        logger.error(
            "dpop replay_store_ping_failed backend=%s cause=%s: %s",
            where,
            type(exc).__name__,
            exc,
            extra=log_extra(
                "replay_store_ping_failed",
                {"backend": where, "cause": f"{type(exc).__name__}: {exc}"},
            ),
        )
        raise ReplayStoreError(
            f"replay_store: PING to {where} failed at start-up (ping_on_startup=True): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    logger.info(
        "dpop replay_store_ping ok backend=%s",
        where,
        extra=log_extra("replay_store_ping", {"backend": where}),
    )
    return built


# --------------------------------------------------------------------------------------------
# the stores


@functools.lru_cache(maxsize=64)  # one TTL per settings object: computed once, not per request
def px_for(ttl: float) -> int:
    """``ttl`` seconds as whole milliseconds for ``PX``: rounded up, never below 1 ms."""
    if not ttl > 0:  # also NaN
        return 1
    ms = ttl * 1000.0
    if ms >= _MAX_PX:
        return _MAX_PX
    # round() first so that 0.05 s is 50 ms, not 51 (0.05 * 1000 == 50.00000000000001).
    return max(1, math.ceil(round(ms, 6)))


_SET_NX = b"*6\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$1\r\n1\r\n$2\r\nNX\r\n$2\r\nPX\r\n$%d\r\n%s\r\n"
_SET = b"+OK\r\n"
_NOT_SET = b"$-1\r\n"  # RESP2 nil: the clients built here speak RESP2 (no push frames)


def _set_nx_on(conn: Any, rkey: bytes, px: int) -> bool:
    """``SET rkey 1 NX PX px`` on a connected redis-py connection's socket: True when it set.

    The command is hand-encoded RESP and the reply is one line: ``+OK``, the nil ``$-1`` (the
    key exists), or an error (``-READONLY ...`` after a failover, ``-OOM ...``), which raises
    ``ResponseError``; so does anything else, and the caller then drops the connection. Without
    a socket attribute (a future redis-py) it falls back to redis-py's own send and parse.
    """
    sock: Any = getattr(conn, "_sock", _NO_SOCKET)
    if sock is _NO_SOCKET:
        conn.send_command("SET", rkey, b"1", "NX", "PX", px)
        return conn.read_response() is not None
    if sock is None:
        conn.connect()
        sock = conn._sock
    digits = b"%d" % px
    try:
        sock.sendall(_SET_NX % (len(rkey), rkey, len(digits), digits))
        reply = sock.recv(256)
        while not reply.endswith(b"\r\n"):
            more = sock.recv(4096)
            if not more:
                raise redis.exceptions.ConnectionError("Redis closed the connection")
            reply += more
    except TimeoutError as exc:  # as redis-py reports them
        raise RedisTimeoutError("Timeout reading from socket") from exc
    except OSError as exc:
        raise redis.exceptions.ConnectionError(f"Error while talking to Redis: {exc}") from exc
    if reply == _SET:
        return True
    if reply == _NOT_SET:
        return False
    text = reply[:200].decode("utf-8", "replace").strip()
    raise redis.exceptions.ResponseError(f"unexpected reply to SET NX: {text}")


_NO_SOCKET = object()


#: At most one "down" line per this many seconds (per store and process): a failover that flaps
#: for a while gives a handful of lines, not one pair per flap.
STATE_LOG_INTERVAL = 30.0


class _Health:
    """One log line when the backend goes down and one when it is back (not one per request).

    A "down" line comes at most once per :data:`STATE_LOG_INTERVAL`; outages that start and end
    inside that quiet time are counted, not logged, and the next line says how many there were.
    A "recovered" line always follows a logged "down" line, at the first success.
    """

    __slots__ = ("_last_report", "_lock", "_unlogged", "clock", "down", "reported_down", "where")

    def __init__(self, where: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.where = where
        self.clock = clock
        self.down = False  # as of the last call
        self.reported_down = False  # the last line logged said "down"
        self._last_report = -math.inf
        self._unlogged = 0  # outages that began in a quiet time and were not logged
        self._lock = threading.Lock()  # threads fail together: one of them logs

    def _more(self) -> str:
        n = self._unlogged
        return f" ({n} more short outage{'s' if n != 1 else ''} not logged before this line)" if n else ""

    def failed(self, exc: BaseException) -> ReplayStoreError:
        with self._lock:
            self._report_down(exc)
        return ReplayStoreError(f"redis SET NX failed ({self.where}): {type(exc).__name__}: {exc}")

    def _report_down(self, exc: BaseException) -> None:
        if not self.down:
            self.down = True
            self._unlogged += 1
        if not self.reported_down:
            now = self.clock()
            if now - self._last_report >= STATE_LOG_INTERVAL:
                self._unlogged -= 1  # this one is logged now
                logger.error(
                    "dpop replay_store_down backend=%s cause=%s: %s; refusing DPoP requests with "
                    "503 until it answers%s",
                    self.where,
                    type(exc).__name__,
                    exc,
                    self._more(),
                    extra=log_extra(
                        "replay_store_down",
                        {"backend": self.where, "cause": f"{type(exc).__name__}: {exc}"},
                    ),
                )
                self.reported_down = True
                self._last_report = now
                self._unlogged = 0

    def recovered(self) -> None:
        with self._lock:
            self.down = False
            if self.reported_down:
                self.reported_down = False
                logger.warning(
                    "dpop replay_store_recovered backend=%s%s",
                    self.where,
                    self._more(),
                    extra=log_extra("replay_store_recovered", {"backend": self.where}),
                )
                self._unlogged = 0


class _Pin:
    """A thread's pinned pool connection, handed back to its pool when the thread ends.

    Only the thread's ``threading.local`` refers to it, so it is collected as the thread ends
    and :func:`weakref.finalize` then releases the connection (still open, for the next thread
    to reuse). Never in another process: after a fork the parent's pool is not touched (its
    lock may have been held by a thread that does not exist here).
    """

    __slots__ = ("__weakref__", "_conn", "_release")

    def __init__(self, pool: Any, conn: Any) -> None:
        self._conn = conn
        self._release = weakref.finalize(self, _release_pinned, pool, conn, os.getpid())
        self._release.atexit = False

    def release(self, *, disconnect: bool) -> None:
        """Hand the connection back now (closed first when ``disconnect``)."""
        if disconnect and self._release.alive:
            with contextlib.suppress(Exception):
                self._conn.disconnect()
        self._release()


def _release_pinned(pool: Any, conn: Any, pid: int) -> None:
    if os.getpid() == pid:
        with contextlib.suppress(Exception):  # a closed pool, or one the thread's client left
            pool.release(conn)


class RedisReplayStore:
    """Sync Redis store (for WSGI). Thread-safe; one client per process.

    Build it from the ``replay_store`` setting (:meth:`from_config`), or wrap an application's
    own ``redis.Redis`` / ``redis.RedisCluster`` (``RedisReplayStore(client)``): such a client is
    used as it is (its timeouts, retries and TLS) and is never closed by the store.
    """

    def __init__(
        self,
        client: SyncClient | None = None,
        *,
        key_prefix: str = DEFAULTS["key_prefix"],
        connect: SyncConnect | None = None,
        where: str | None = None,
        watch: FailoverWatch | None = None,
    ) -> None:
        if (client is None) == (connect is None):
            raise ValueError("pass either a client or a connect function")
        self._prefix = key_prefix.encode()
        self._connect = connect
        self._client = client
        self._extras: tuple[redis.Redis, ...] = ()
        self._pid = os.getpid()
        self._lock = threading.Lock()
        # Per-thread pinned connection (see _pinned_set); a new client after a fork means a
        # new connection, because ``local.client`` no longer matches.
        self._local = threading.local()
        self._pinnable: redis.Redis | None = None
        self._health = _Health(where or _describe({"client": client}))
        self._watch = watch
        self._epoch = 0

    @classmethod
    def from_config(cls, config: ReplayStoreConfig) -> RedisReplayStore:
        options = config.options
        if config.client is not None:
            if not isinstance(config.client, redis.Redis | redis.cluster.RedisCluster):
                raise _bad(
                    "client", config.client,
                    "redis.Redis or redis.RedisCluster under WSGI (an asyncio client needs ASGI)",
                )  # fmt: skip
            return cls(config.client, key_prefix=options["key_prefix"])
        where = _describe(options)
        connect = _sync_connect(options)
        store = cls(
            connect=connect,
            key_prefix=options["key_prefix"],
            where=where,
            watch=_failover_watch(options),
        )
        if options["ping_on_startup"]:
            store._client, store._extras = _ping_on_startup(connect, where)
        return store

    def _current(self) -> SyncClient:
        client = self._client
        if self._connect is None:
            assert client is not None
            return client
        pid = os.getpid()
        watch = self._watch
        epoch = watch.epoch if watch is not None else 0
        if client is not None and self._pid == pid and self._epoch == epoch:
            return client
        with self._lock:
            # After a fork the parent's client is dropped, never used or closed here: its
            # sockets belong to the parent (redis-py does not shut down a socket of another pid).
            # After a change of master the whole client is rebuilt, so that no connection of it
            # still points at the old master; threads drop their pinned connection to it.
            if self._client is None or self._pid != pid or self._epoch != epoch:
                old = (self._client, self._extras) if self._pid == pid else (None, ())
                self._client, self._extras = self._connect()  # RedisCluster connects: may raise
                self._pid, self._epoch = pid, epoch
                with contextlib.suppress(Exception):  # the old master's connections go now
                    _close_sync(*old)
            return self._client

    def redis_key(self, key: bytes) -> bytes:
        """The Redis key for a replay key: ``key_prefix`` + hex (no hash tag)."""
        return self._prefix + key.hex().encode("ascii")

    def add(self, key: bytes, ttl: float) -> bool:
        """``SET <prefix><key> 1 NX PX <ttl ms>``: True when it set (first use)."""
        try:
            watch = self._watch
            if watch is not None:
                why = watch.refusal()
                if why is not None:
                    raise FailoverRefusal(why)
            client = self._current()
            pinned = self._pinnable if client is self._pinnable else self._may_pin(client)
            if pinned is not None:
                first = self._pinned_set(pinned, self.redis_key(key), px_for(ttl))
            else:
                first = bool(client.set(self.redis_key(key), b"1", nx=True, px=px_for(ttl)))
        except Exception as exc:  # any failure of the client is a store failure: fail closed
            # (redis-py has raised AttributeError mid-failover, not only its own errors)
            raise self._health.failed(exc) from exc
        if self._health.down:
            self._health.recovered()
        return first

    def _may_pin(self, client: SyncClient) -> redis.Redis | None:
        """``client`` if this store built it and it is a plain or Sentinel one (not an app's,
        not a cluster): decided once per client, as ``isinstance`` on its class is slow."""
        if self._connect is None or not isinstance(client, redis.Redis):
            return None
        self._pinnable = client
        return client

    def _pinned_set(self, client: redis.Redis, rkey: bytes, px: int) -> bool:
        """The SET on this thread's own connection of ``client``'s pool.

        redis-py's ``set()`` takes a connection from the pool and gives it back on every call,
        under a lock and a retry wrapper, and packs and parses in Python: together more CPU than
        the round trip itself. A client this store built makes one attempt anyway, so each thread
        keeps one connection, which redis-py opens (TCP or unix socket, TLS, AUTH, SELECT); the
        one command and its one-line reply then go over that connection's socket directly
        (:func:`_set_nx_on`). On any error the connection is disconnected and handed back, and
        the next call takes a fresh one.

        The connection goes back to the pool when the thread ends (:class:`_Pin`): a
        thread-per-connection server (werkzeug's threaded server, Django's runserver) starts a
        thread per client, and a connection kept past its thread would fill the pool for good.
        """
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or local.client is not client:
            pin = getattr(local, "pin", None)
            if pin is not None:  # a connection of a client replaced after a change of master
                local.pin = None
                pin.release(disconnect=True)
            conn = client.connection_pool.get_connection()
            local.pin = pin = _Pin(client.connection_pool, conn)
            if self._watch is not None:
                why = _wrong_master(conn, self._watch)
                if why is not None:  # dropped: the next call asks Sentinel again
                    local.pin = None
                    pin.release(disconnect=True)
                    raise FailoverRefusal(why)
            local.conn, local.client = conn, client
        try:
            return _set_nx_on(conn, rkey, px)
        except BaseException:
            local.conn = None
            pin, local.pin = local.pin, None
            pin.release(disconnect=True)
            raise

    def close(self) -> None:
        """Close the client this store built (in this process); an app's own client is left."""
        if self._connect is None:
            return
        if self._watch is not None:
            self._watch.close()
        with self._lock:
            client, self._client = self._client, None
            extras, self._extras = self._extras, ()
        if self._pid == os.getpid():
            _close_sync(client, extras)


_MAX_BATCH = 256


def _fail(entries: Sequence[tuple[bytes, int, asyncio.Future[Any]]], exc: BaseException) -> None:
    for _, _, future in entries:
        if not future.done():
            future.set_exception(exc)


class _Coalescer:
    """Coalesces concurrent ``SET NX`` calls into one pipelined round trip (async store).

    Under load many requests wait on Redis at once. Instead of one pooled connection and one
    round trip each, calls queue here; one task sends everything queued in a single write on one
    connection and reads the replies in order (Redis answers pipelined commands in order). While
    a batch is in flight the next one gathers, so a lone request pays one round trip and 64
    concurrent ones pay about one between them. Each command is still an independent atomic
    ``SET NX``: batching changes the transport, not the decision. Any error or a round trip past
    ``timeout`` fails the whole batch (every request in it is refused: fail closed) and drops
    the connection; the next batch opens a new one.
    """

    def __init__(
        self, client: redis.asyncio.Redis, timeout: float, watch: FailoverWatch | None = None
    ) -> None:
        self._client = client
        self._timeout = timeout
        self._watch = watch  # with Sentinel: a new connection must reach the announced master
        self._queue: list[tuple[bytes, int, asyncio.Future[Any]]] = []
        self._conn: Any = None
        self._task: asyncio.Task[None] | None = None
        self._sent_at: float | None = None  # loop time the open round trip was sent, if any
        self._deadlines: collections.deque[tuple[float, asyncio.Future[Any]]] = (
            collections.deque()
        )
        self._timer: asyncio.TimerHandle | None = None

    def set_nx(self, rkey: bytes, px: int, deadline: float) -> asyncio.Future[Any]:
        """A future for the reply to ``SET rkey 1 NX PX px``; it fails with RedisTimeoutError
        at ``deadline`` (loop time), the request's own, however many batches wait before it."""
        loop = asyncio.get_running_loop()
        sent = self._sent_at
        if sent is not None and len(self._queue) >= _MAX_BATCH:
            overdue = loop.time() - sent
            if overdue > self._timeout / 2:
                # Redis is hung or far behind: a round trip has been open for half the
                # deadline and a full batch already waits behind it. Refuse now rather than
                # queue for a deadline that cannot be met (the queue would grow with the load).
                raise RedisTimeoutError(
                    f"Redis has not answered for {overdue:.2f} s and {len(self._queue)} "
                    "requests are queued"
                )
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((rkey, px, future))
        if self._task is None:
            self._task = loop.create_task(self._drain())
        # One timer for all: requests share one timeout, so deadlines come in queue order and
        # only the earliest needs a timer (a timer per request costs more than the SET itself).
        deadlines = self._deadlines
        if deadlines and deadline < deadlines[-1][0]:
            deadline = deadlines[-1][0]  # only a first call that waited for the failover watch
        deadlines.append((deadline, future))
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)
        return future

    def _expire(self) -> None:
        """Fail the requests whose deadline has passed; set the timer for the next one."""
        self._timer = None
        deadlines = self._deadlines
        now = asyncio.get_running_loop().time()
        while deadlines and (deadlines[0][0] <= now or deadlines[0][1].done()):
            _, future = deadlines.popleft()
            if not future.done():  # left in the queue, or in a batch still in flight
                future.set_exception(
                    RedisTimeoutError(f"no reply from Redis within {self._timeout:g} s")
                )
        if deadlines:
            self._timer = asyncio.get_running_loop().call_at(deadlines[0][0], self._expire)

    async def _drain(self) -> None:
        batch: list[tuple[bytes, int, asyncio.Future[Any]]] = []
        try:
            while self._queue:
                # Requests that gave up (their own deadline passed) are not sent.
                live = [entry for entry in self._queue if not entry[2].done()]
                batch, self._queue = live[:_MAX_BATCH], live[_MAX_BATCH:]
                if not batch:
                    continue
                try:
                    try:
                        async with asyncio.timeout(self._timeout):
                            replies = await self._round_trip(batch)
                    except TimeoutError as exc:
                        if isinstance(exc, RedisTimeoutError):
                            raise
                        raise RedisTimeoutError(
                            f"no reply from Redis within {self._timeout:g} s"
                        ) from exc
                except Exception as exc:  # handed to every waiting request; add() maps it
                    _fail(batch, exc)
                    await self._drop()
                else:
                    for (_, _, future), reply in zip(batch, replies, strict=True):
                        if not future.done():
                            future.set_result(reply)
                batch = []
                deadlines = self._deadlines
                while deadlines and deadlines[0][1].done():  # answered: no deadline to keep
                    deadlines.popleft()
        finally:
            # Only here if this task was cancelled (aclose(): the store closes, or the master
            # changed): the batch in flight and those queued are refused, never left waiting.
            # A CancelledError is not an Exception, so it is not what the requests are given.
            self._task = None
            closed = redis.exceptions.ConnectionError(
                "replay store connection closed (store closed or Redis master changed)"
            )
            _fail(batch, closed)
            _fail(self._queue, closed)
            self._queue = []

    async def _round_trip(self, batch: list[tuple[bytes, int, asyncio.Future[Any]]]) -> list[Any]:
        self._sent_at = asyncio.get_running_loop().time()
        try:
            conn = self._conn
            if conn is None:  # connecting is part of the round trip (and may hang as well)
                pool = self._client.connection_pool
                conn = self._conn = await pool.get_connection()  # type: ignore[no-untyped-call]
                if self._watch is not None:
                    why = _wrong_master(conn, self._watch)
                    if why is not None:  # the batch is refused and the connection dropped
                        raise FailoverRefusal(why)
            commands = [("SET", rkey, b"1", "NX", "PX", px) for rkey, px, _ in batch]
            await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            return [await conn.read_response() for _ in batch]
        finally:
            self._sent_at = None

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # It is being thrown away; the error that brought us here is the one reported.
            with contextlib.suppress(Exception):
                await conn.disconnect()
            await self._client.connection_pool.release(conn)

    async def aclose(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()  # the drain refuses what it had (see its ``finally``)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self._drop()


class AsyncRedisReplayStore:
    """Async Redis store (redis.asyncio, for ASGI); same behaviour as :class:`RedisReplayStore`.

    A client built from settings is bound to the event loop and process that first use it, and
    rebuilt if either changes. An application's own client is used as it is and never closed.
    """

    def __init__(
        self,
        client: AsyncClient | None = None,
        *,
        key_prefix: str = DEFAULTS["key_prefix"],
        connect: AsyncConnect | None = None,
        where: str | None = None,
        timeout: float = DEFAULTS["timeout"],
        watch: FailoverWatch | None = None,
    ) -> None:
        if (client is None) == (connect is None):
            raise ValueError("pass either a client or a connect function")
        self._prefix = key_prefix.encode()
        self._connect = connect
        self._client = client
        self._extras: tuple[redis.asyncio.Redis, ...] = ()
        self._pid = os.getpid()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timeout = timeout
        self._coalescer: _Coalescer | None = None
        self._health = _Health(where or _describe({"client": client}))
        self._watch = watch
        self._epoch = 0
        self._retiring: set[asyncio.Task[None]] = set()

    @classmethod
    def from_config(cls, config: ReplayStoreConfig) -> AsyncRedisReplayStore:
        options = config.options
        if config.client is not None:
            if not isinstance(
                config.client, redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster
            ):
                raise _bad(
                    "client", config.client,
                    "redis.asyncio.Redis or redis.asyncio.RedisCluster under ASGI (a sync client "
                    "would block the event loop)",
                )  # fmt: skip
            return cls(config.client, key_prefix=options["key_prefix"])
        where = _describe(options)
        if options["ping_on_startup"]:
            # Creation is synchronous, so the start-up PING uses a short-lived sync client with
            # the same settings (it blocks for at most about ``timeout``, once).
            _close_sync(*_ping_on_startup(_sync_connect(options), where))
        return cls(
            connect=_async_connect(options),
            key_prefix=options["key_prefix"],
            where=where,
            timeout=options["timeout"],
            watch=_failover_watch(options),
        )

    def _current(self) -> AsyncClient:
        client = self._client
        if self._connect is None:
            assert client is not None
            return client
        loop = asyncio.get_running_loop()
        pid = os.getpid()
        watch = self._watch
        epoch = watch.epoch if watch is not None else 0
        if self._epoch != epoch and client is not None and self._loop is loop and self._pid == pid:
            # A change of master: close the old client (and its connection to the old master)
            # in the background, and build a new one that asks Sentinel where the master is.
            self._retire(client, self._extras, self._coalescer)
            client = None
        if client is None or self._loop is not loop or self._pid != pid:
            # A client of another loop or process is dropped, not closed: its connections
            # cannot be used or awaited from here.
            client, self._extras = self._connect()
            self._client, self._loop, self._pid, self._epoch = client, loop, pid, epoch
            self._coalescer = (
                None
                if isinstance(client, redis.asyncio.cluster.RedisCluster)
                else _Coalescer(client, self._timeout, watch)
            )
        return client

    def _retire(
        self,
        client: AsyncClient,
        extras: tuple[redis.asyncio.Redis, ...],
        coalescer: _Coalescer | None,
    ) -> None:
        async def close() -> None:
            with contextlib.suppress(Exception):
                if coalescer is not None:
                    await coalescer.aclose()
                for each in (client, *extras):
                    await each.aclose()

        task = asyncio.get_running_loop().create_task(close())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def redis_key(self, key: bytes) -> bytes:
        """The Redis key for a replay key: ``key_prefix`` + hex (no hash tag)."""
        return self._prefix + key.hex().encode("ascii")

    async def add(self, key: bytes, ttl: float) -> bool:
        """``SET <prefix><key> 1 NX PX <ttl ms>``: True when it set (first use).

        A store built from settings answers within ``timeout`` of the call (a store error
        after that), however many requests wait before this one.
        """
        try:
            deadline = asyncio.get_running_loop().time() + self._timeout
            watch = self._watch
            if watch is not None:
                # The first use in a process starts the watch and waits for it: in a thread.
                why = await asyncio.to_thread(watch.refusal) if watch.starting else watch.refusal()
                if why is not None:
                    raise FailoverRefusal(why)
            client = self._current()
            coalescer = self._coalescer
            if coalescer is not None and self._connect is not None:
                reply = await coalescer.set_nx(self.redis_key(key), px_for(ttl), deadline)
            else:
                reply = await client.set(self.redis_key(key), b"1", nx=True, px=px_for(ttl))
        except Exception as exc:  # any failure of the client is a store failure: fail closed
            # (redis-py has raised AttributeError mid-failover, not only its own errors)
            raise self._health.failed(exc) from exc
        if self._health.down:
            self._health.recovered()
        return bool(reply)

    async def aclose(self) -> None:
        """Close the client this store built (on this loop); an app's own client is left."""
        if self._connect is None:
            return
        if self._watch is not None:
            self._watch.close()
        client, self._client = self._client, None
        extras, self._extras = self._extras, ()
        coalescer, self._coalescer = self._coalescer, None
        if client is None or self._pid != os.getpid():
            return
        if coalescer is not None:
            await coalescer.aclose()
        try:
            same_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            same_loop = False
        if same_loop:
            for each in (client, *extras):
                await each.aclose()
