"""In-process replay store: thread-safe, lazily expiring, bounded, never evicting live entries.

Entries are kept in *generations*: each generation is a dict filled during one ``period`` of
wall time and remembers the latest expiry it holds, so a whole generation is dropped in O(1) once
everything in it has expired. Each entry also keeps its own expiry, so answers are exact.
Keys are the first 16 bytes of the verifier's BLAKE2b-256 replay key (128 bits: collisions are
not a practical concern), which keeps a live entry well under 200 bytes.

When ``max_entries`` live entries are held, new proofs are refused with
:class:`~dpop_middleware.errors.ReplayStoreFullError` (a 503): evicting a live entry would let
its proof be replayed. The cap bounds memory; :func:`default_max_entries` sizes it so that one
process accepting proofs as fast as it can never reaches it within a replay window.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable

from dpop_middleware.errors import ReplayStoreFullError
from dpop_middleware.logfields import log_extra

DEFAULT_MAX_ENTRIES = 1_000_000

#: Accepted proofs per second that one process cannot reach. On the VM of the README's
#: performance table a warm request costs 72 us of one core in the core alone (13,900/s; the
#: fastest proof is ES256, and cryptography verifies holding the GIL, so one process verifies on
#: one core at a time), and Starlette under uvicorn served 3,600/s with the middleware. 20,000/s
#: is 1.4 times the first and 5.5 times the second: room for a faster core.
MAX_PROOFS_PER_SECOND = 20_000


def default_max_entries(ttl: float) -> int:
    """The cap when the ``replay_store`` setting names none, for entries kept ``ttl`` seconds.

    At least :data:`DEFAULT_MAX_ENTRIES`, and room for every proof one process can accept in
    ``ttl`` (:data:`MAX_PROOFS_PER_SECOND`): otherwise one client at full speed fills the store
    before its first entries expire (about 84 s for a million at 12,000/s, under the 901 s TTL of
    a 300 s nonce lifetime), and then every client gets 503 until they do.
    """
    return max(DEFAULT_MAX_ENTRIES, math.ceil(ttl * MAX_PROOFS_PER_SECOND))


_KEY_BYTES = 16

logger = logging.getLogger("dpop_middleware")


class _Generation:
    __slots__ = ("entries", "max_expiry", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.max_expiry = started
        self.entries: dict[bytes, float] = {}


#: Forks seen by this process (bumped in each child): ``add`` compares it with an int instead of
#: calling ``os.getpid()``, a system call, on every request.
_forks = 0


def _after_fork_in_child() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


class MemoryReplayStore:
    """Sync in-memory store (one process only: use Redis when several workers serve one API)."""

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        *,
        period: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._period = period
        self._clock = clock
        self._lock = threading.Lock()
        self._generations: list[_Generation] = []
        self._size = 0
        self._built_pid = os.getpid()
        self._seen_forks = -1  # _forks at the last use: checked once per process
        self._warned_pid = 0

    def _first_use_in_process(self) -> None:
        self._seen_forks = _forks
        pid = os.getpid()
        if pid != self._built_pid:
            self.warn_shared(
                f"process {pid} was forked after the store was built in process {self._built_pid}"
            )
            return
        workers = os.environ.get("WEB_CONCURRENCY", "")
        if workers.isdigit() and int(workers) > 1:
            self.warn_shared(f"WEB_CONCURRENCY={workers}")

    def warn_shared(self, why: str) -> None:
        """Warn once per process that this store is not shared between worker processes."""
        pid = os.getpid()
        if self._warned_pid == pid:
            return
        self._warned_pid = pid
        logger.warning(
            "dpop memory_replay_store_not_shared pid=%d: %s. Each worker process has its own "
            "memory replay store, so a proof replayed to another worker is accepted: with more "
            "than one worker, use a Redis replay_store (docs: Replay store and scaling out)",
            pid,
            why,
            extra=log_extra("memory_replay_store_not_shared", {"pid": pid, "cause": why}),
        )

    def __len__(self) -> int:
        return self._size

    def _expire(self, now: float) -> None:
        gens = self._generations
        while gens and gens[0].max_expiry <= now:
            self._size -= len(gens.pop(0).entries)
        # A generation whose newest expiry is still ahead may hold long-dead entries: they are
        # dropped with it, and until then answered as absent (exact per-entry expiry).

    def add(self, key: bytes, ttl: float) -> bool:
        if self._seen_forks != _forks:
            self._first_use_in_process()
        short = key[:_KEY_BYTES]
        with self._lock:
            now = self._clock()
            gens = self._generations
            if gens and gens[0].max_expiry <= now:
                self._expire(now)
            for gen in gens:
                expiry = gen.entries.get(short)
                if expiry is not None:
                    if expiry > now:
                        return False
                    del gen.entries[short]
                    self._size -= 1
            if self._size >= self.max_entries:
                raise ReplayStoreFullError(
                    f"memory replay store is full ({self.max_entries} live entries); "
                    "raise replay_store max_entries or use Redis"
                )
            if not gens or now - gens[-1].started >= self._period:
                gens.append(_Generation(now))
            current = gens[-1]
            expiry = now + ttl
            current.entries[short] = expiry
            if expiry > current.max_expiry:
                current.max_expiry = expiry
            self._size += 1
            return True

    def close(self) -> None:
        with self._lock:
            self._generations.clear()
            self._size = 0


class AsyncMemoryReplayStore:
    """Async twin: the same store; its work is a few dict operations, so it never blocks."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, **kwargs: object) -> None:
        self.sync = MemoryReplayStore(max_entries, **kwargs)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.sync)

    async def add(self, key: bytes, ttl: float) -> bool:
        return self.sync.add(key, ttl)

    async def aclose(self) -> None:
        self.sync.close()
