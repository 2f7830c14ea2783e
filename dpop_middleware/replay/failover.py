"""Following a Redis Sentinel failover, so that no ``SET NX`` lands on a master that is about to
lose it.

With asynchronous replication, a write accepted by the old master after the replica was promoted
is lost: its proof could be replayed. Sentinel announces a failover on its Pub/Sub channels
(``+try-failover`` and the ``+failover-state-*`` steps) before it promotes the replica (about
180 ms before, measured on loopback), and ``+switch-master`` once the new master is in place.
:class:`FailoverWatch` listens to every configured Sentinel in a daemon thread per process and
tells the store to refuse writes (a 503: fail closed) from the first sign of a failover of its
service until ``+switch-master``, then to drop its connections (``epoch`` changes) and reconnect
through Sentinel to the new master. It also refuses while the master is objectively down
(``+odown``) and while no Sentinel is being watched: a store that cannot see a failover cannot
promise it is writing to the right master.

After a reconnection, or while unsure for a while, it asks the Sentinel (``SENTINEL MASTER``)
for the flags and address instead of trusting only the messages, so a missed message cannot
leave the store refusing or writing to the wrong place for long.

No redis import here: :mod:`dpop_middleware.replay.redis` hands in a function that builds a
Sentinel client.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger("dpop_middleware")

#: Sentinel events that mean a failover of the named master has begun (RFC-less: Redis docs,
#: "Sentinel API", Pub/Sub messages).
_FAILOVER_STARTS = frozenset(
    {
        "+try-failover",
        "+elected-leader",
        "+failover-state-select-slave",
        "+selected-slave",
        "+failover-state-send-slaveof-noone",
        "+failover-state-wait-promotion",
        "+promoted-slave",
        "+failover-state-reconf-slaves",
        "+failover-end",
        "+failover-end-for-timeout",
    }
)
#: How often a thread that is unsure (or idle) checks with its Sentinel directly.
_RECHECK = 0.5
_RETRY = 0.2


def _master_of(channel: str, data: str) -> str | None:
    """The master name an event is about: ``master <name> ...``, or ``... @ <name> ...``."""
    parts = data.split()
    if channel == "+switch-master":
        return parts[0] if parts else None
    if "@" in parts:
        at = parts.index("@")
        return parts[at + 1] if at + 1 < len(parts) else None
    if len(parts) >= 2 and parts[0] == "master":
        return parts[1]
    return None


class FailoverWatch:
    """Watches the Sentinels of one service; :meth:`refusal` says whether to refuse writes now.

    ``connect(host, port)`` builds a Sentinel client (redis-py, decoded responses not required).
    """

    def __init__(
        self,
        service: str,
        sentinels: Sequence[tuple[str, int]],
        connect: Callable[[str, int], Any],
        *,
        timeout: float,
    ) -> None:
        self.service = service
        self._nodes = tuple(sentinels)
        self._connect = connect
        self._timeout = timeout
        #: Bumped at each change of master: connections of an older epoch are dropped.
        self.epoch = 0
        self._lock = threading.Lock()
        self._pid = 0
        self._watching: set[tuple[str, int]] = set()
        self._failover: set[tuple[str, int]] = set()  # Sentinels that report a failover
        self._odown: set[tuple[str, int]] = set()
        self._address: tuple[str, int] | None = None  # the master the store is told to use
        self._views: dict[tuple[str, int], tuple[str, int] | None] = {}  # each Sentinel's view
        self._ready = threading.Event()
        self._start_deadline = 0.0
        self._stop = threading.Event()

    # -- what the store asks ---------------------------------------------------------------------

    @property
    def starting(self) -> bool:
        """True while a first use in this process would wait for the first subscription."""
        return self._pid != os.getpid() or (
            not self._ready.is_set() and time.monotonic() < self._start_deadline
        )

    @property
    def address(self) -> tuple[str, int] | None:
        """The master's ``(host, port)`` as the watched Sentinels announced it (None before the
        first answer). A connection to any other address must not be written to: a Sentinel
        that has not yet seen a switch may still name the old master when the store
        reconnects, and in a planned failover the old master accepts writes until
        reconfigured."""
        return self._address

    def refusal(self) -> str | None:
        """Why writes must be refused now, or None. Starts the watch in a new process; for
        ``timeout`` after that, waits for a first subscription."""
        if self._pid != os.getpid():
            self._start()
        if not self._ready.is_set():
            remaining = self._start_deadline - time.monotonic()
            if remaining > 0:
                self._ready.wait(remaining)
        if self._failover:
            return "a Sentinel failover is in progress"
        if self._odown:
            return "the master is objectively down (Sentinel)"
        if not self._watching:
            return "not watching any Sentinel (none answers)"
        return None

    def _start(self) -> None:
        with self._lock:
            pid = os.getpid()
            if self._pid == pid:
                return
            # After a fork the parent's threads are gone: start afresh (state included).
            self._pid = pid
            self._watching, self._failover, self._odown = set(), set(), set()
            self._views = {}
            self._ready = threading.Event()
            self._start_deadline = time.monotonic() + self._timeout
            self._stop = stop = threading.Event()
            for node in self._nodes:
                thread = threading.Thread(
                    target=self._watch,
                    args=(node, stop),
                    name=f"dpop-sentinel-watch:{node[0]}:{node[1]}",
                    daemon=True,
                )
                thread.start()

    def close(self) -> None:
        """Stop the watch threads of this process (a later use starts new ones)."""
        with self._lock:
            self._stop.set()
            self._pid = 0
            self._watching = set()

    # -- the watch thread ------------------------------------------------------------------------

    def _watch(self, node: tuple[str, int], stop: threading.Event) -> None:
        while not stop.is_set():
            client: Any = None
            try:
                client = self._connect(*node)
                pubsub = client.pubsub()
                pubsub.psubscribe("*")
                self._check(client, node)  # after the subscription: nothing missed in between
                self._watching.add(node)
                self._ready.set()
                last_check = time.monotonic()
                while not stop.is_set():
                    message = pubsub.get_message(timeout=_RECHECK)
                    if message is not None and message.get("type") == "pmessage":
                        self._event(node, _text(message["channel"]), _text(message["data"]))
                    now = time.monotonic()
                    if now - last_check >= _RECHECK:
                        last_check = now
                        # The subscription is what watches; a slow answer here (a busy Sentinel)
                        # is not a lost watch: try again next time.
                        with contextlib.suppress(Exception):
                            self._check(client, node)
            except Exception as exc:  # any failure: not watching from this Sentinel, retry
                if node in self._watching:
                    logger.warning(
                        "dpop sentinel_watch_lost sentinel=%s:%d cause=%s: %s",
                        node[0],
                        node[1],
                        type(exc).__name__,
                        str(exc)[:200],
                    )
                self._watching.discard(node)
                self._failover.discard(node)
                self._odown.discard(node)
            finally:
                if client is not None:
                    with contextlib.suppress(Exception):  # it may have failed already
                        client.close()
            stop.wait(_RETRY)
        self._watching.discard(node)

    def _event(self, node: tuple[str, int], channel: str, data: str) -> None:
        if _master_of(channel, data) != self.service:
            return
        if channel == "+switch-master":
            parts = data.split()
            self._view(node, (parts[3], int(parts[4])) if len(parts) >= 5 else None)
            self._odown.discard(node)
            self._failover.discard(node)
        elif channel in _FAILOVER_STARTS:
            if node not in self._failover:
                logger.warning(
                    "dpop sentinel_failover_started service=%s sentinel=%s:%d event=%s; refusing "
                    "DPoP requests with 503 until the new master is in place",
                    self.service,
                    node[0],
                    node[1],
                    channel,
                )
            self._failover.add(node)
        elif channel.startswith("-failover-abort"):
            self._failover.discard(node)
        elif channel == "+odown":
            self._odown.add(node)
        elif channel == "-odown":
            self._odown.discard(node)

    def _view(self, node: tuple[str, int], address: tuple[str, int] | None) -> None:
        """Record where this Sentinel says the master is; a change means a new master.

        Only a change in one Sentinel's own view counts (Sentinels that disagree for a moment
        do not make the store reconnect back and forth), and each new address once.
        """
        with self._lock:
            before = self._views.get(node, address)
            self._views[node] = address
            if self._address is None:
                self._address = address
            if address == before or address == self._address:
                return
            self._address = address
            self.epoch += 1  # before the failover flag is cleared: the store sees both in order
        logger.warning(
            "dpop sentinel_switch_master service=%s new_master=%s; reconnecting",
            self.service,
            f"{address[0]}:{address[1]}" if address else "?",
        )

    def _check(self, client: Any, node: tuple[str, int]) -> None:
        """Ask this Sentinel for its view of the master: flags and address."""
        reply = client.execute_command("SENTINEL", "MASTER", self.service)
        fields = dict(zip(map(_text, reply[::2]), map(_text, reply[1::2]), strict=False))
        flags = set(fields.get("flags", "").split(","))
        self._view(node, (fields.get("ip", ""), int(fields.get("port", "0") or 0)))
        if "failover_in_progress" in flags:
            self._failover.add(node)
        else:
            self._failover.discard(node)
        if "o_down" in flags:
            self._odown.add(node)
        else:
            self._odown.discard(node)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
