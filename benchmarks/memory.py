"""Bytes per live entry of the memory replay store: ``python -m benchmarks.memory --entries N``.

Run in a process of its own (so that nothing freed earlier is reused): first the RSS growth
while filling a store with N live entries (a cross-check: it includes the allocator's slack),
then, with a new store, the Python heap growth traced by ``tracemalloc`` (the figure reported).
Keys are SHA-256 digests, like the verifier's replay keys; every entry stays live (TTL one hour).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
import tracemalloc

from dpop_middleware.replay.memory import MemoryReplayStore

_TTL = 3600.0


def _rss() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _fill(entries: int) -> MemoryReplayStore:
    store = MemoryReplayStore(entries + 1)
    add, digest = store.add, hashlib.sha256
    for i in range(entries):
        if not add(digest(i.to_bytes(8, "big")).digest(), _TTL):
            raise RuntimeError("a fresh key was answered as seen")
    if len(store) != entries:
        raise RuntimeError(f"{len(store)} live entries, expected {entries}")
    return store


def measure(entries: int) -> dict[str, float | int | None]:
    gc.collect()
    before = _rss()
    store = _fill(entries)
    gc.collect()
    after = _rss()
    rss = None if before is None or after is None else (after - before) / entries
    del store
    gc.collect()

    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    store = _fill(entries)
    gc.collect()
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(store) == entries  # the store is alive until here
    return {
        "entries": entries,
        "bytes_per_entry": (current - base) / entries,
        "rss_bytes_per_entry": rss,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__)
    parser.add_argument("--entries", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    json.dump(measure(args.entries), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
