"""Profile one hot path: ``python -m benchmarks.profile asgi|core|core-redis [--tool ...]``.

``asgi`` is the ASGI middleware with the async Redis store under 64 concurrent requests,
``core`` the core warm path with the memory store, ``core-redis`` the core with the sync Redis
store; the same setup as their benchmark rows, after one warm-up round. ``--tool pyinstrument``
(the default when it is installed, as it is by the ``dev`` extra) prints
its call tree; ``--tool cprofile`` prints the functions with the most own time.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import pstats
import sys
from collections.abc import Callable

from benchmarks.common import PLANS, Client, redis_cleanup, run_prefix
from benchmarks.inprocess import Bench, build

_ROWS = {
    "asgi": "asgi_redis_async_64",
    "core": "core_memory_warm",
    "core-redis": "core_redis_sync_warm",
}


def _profile(run: Callable[[], None], tool: str, top: int, show_all: bool) -> str:
    if tool == "pyinstrument":
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0002)
        profiler.start()
        run()
        profiler.stop()
        text: str = profiler.output_text(unicode=False, color=False, show_all=show_all)
        return text
    prof = cProfile.Profile()
    prof.enable()
    run()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    parser.add_argument("path", choices=sorted(_ROWS))
    default_tool = "pyinstrument" if importlib.util.find_spec("pyinstrument") else "cprofile"
    parser.add_argument("--tool", choices=("pyinstrument", "cprofile"), default=default_tool)
    parser.add_argument("--rounds", type=int, default=5, help="rounds profiled (full-size)")
    parser.add_argument("--top", type=int, default=30, help="cprofile: how many functions")
    parser.add_argument("--show-all", action="store_true", help="pyinstrument: keep library frames")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)

    client = Client()
    prefix = run_prefix()
    group = "asgi" if args.path == "asgi" else "core"
    benches = build(PLANS["full"], client, args.redis_url, prefix, {group})
    try:
        bench: Bench = next(b for b in benches if b.name == _ROWS[args.path])
        bench.round(record=False)  # warm-up
        work = [bench.prepare() for _ in range(args.rounds)]  # fresh proofs, not profiled
        count = 0

        def run() -> None:
            nonlocal count
            for item in work:
                count += bench.execute(item)

        print(_profile(run, args.tool, args.top, args.show_all))
        if bench.failures:
            print(f"{len(bench.failures)} failed, the first: {bench.failures[0]}")
            return 1
    finally:
        for b in benches:
            b.close()
        redis_cleanup(args.redis_url, prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
