"""``python -m benchmarks``: run every row once, print the table, optionally write JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import PLANS, BenchmarkError, Client, Plan, Row, Samples

GROUPS = ("core", "asgi", "http", "memory")
FLOOR_VERIFY = "floor_es256_verify"
FLOOR_REDIS = "floor_redis_set_nx_px"
FLOOR_SUM = "floor_verify_plus_redis"
FLOOR_SEQUENCE = "floor_verify_then_redis"
#: The warm core with observers on (issue 17); each has an ``_added`` row: its cost over
#: ``core_memory_warm`` per request, measured in the same rounds.
OBSERVED = {
    "core_memory_warm_metrics": ("Prometheus metrics", 3.0),
    "core_memory_warm_tracing_noop": ("tracing, OpenTelemetry API no-op provider", None),
    "core_memory_warm_tracing_sdk": ("tracing, OpenTelemetry SDK provider, no exporter", None),
}
MACHINE_NOTE = (
    "{cpus} CPU cores, shared: the load generator runs beside the servers it loads, and other "
    "work on the machine adds noise; nothing is pinned. Ratios divide medians of the same run."
)


def row_names(plan: Plan | None = None) -> list[str]:
    """Every row a complete run reports, in table order."""
    conc = (plan or PLANS["full"]).asgi_concurrency
    return [
        FLOOR_VERIFY, FLOOR_REDIS, FLOOR_SUM, FLOOR_SEQUENCE,
        "core_memory_warm", "core_memory_cold", "core_redis_sync_warm",
        "core_introspection_warm", "core_introspection_miss",
        *OBSERVED, *(f"{name}_added" for name in OBSERVED),
        f"asgi_redis_async_{conc}", f"asgi_memory_{conc}",
        "http_starlette_uvicorn_plain", "http_starlette_uvicorn_dpop_redis",
        "http_starlette_uvicorn_added",
        "http_flask_gunicorn_plain", "http_flask_gunicorn_dpop_redis", "http_flask_gunicorn_added",
        "memory_store_bytes_per_entry",
    ]  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="DPoP verification cost against its floors (ES256 verify, Redis SET NX PX).",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller sizes; under 60 s")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes: proves every row runs")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="write the table as Markdown")
    parser.add_argument(
        "--only",
        action="append",
        choices=GROUPS,
        help="run only these groups (repeatable); the floors always run",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="a redis:// URL (default $REDIS_URL or redis://127.0.0.1:6379/0)",
    )
    return parser


class Progress:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f} s] {message}", file=sys.stderr, flush=True)


def _meta(plan: Plan, redis_url: str) -> dict[str, Any]:
    import cryptography
    import redis
    from cryptography.hazmat.backends.openssl.backend import backend

    from benchmarks.common import redis_info
    from benchmarks.e2e import uvicorn_flavour

    cpus = os.cpu_count() or 0
    return {
        "command": " ".join(["python -m benchmarks", *sys.argv[1:]]),
        "mode": plan.mode,
        "sizes": dataclasses.asdict(plan),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": cpus,
        "load_average_start": list(os.getloadavg()),
        "cryptography": f"{cryptography.__version__} ({backend.openssl_version_text()})",
        "redis_py": redis.__version__,
        "redis_server": redis_info(redis_url),
        "uvicorn": uvicorn_flavour(),
        "note": MACHINE_NOTE.format(cpus=cpus),
        "units": "times in microseconds (us); rps = requests per second; ratio = row / floor",
    }


def _time_row(name: str, what: str, found: dict[str, Samples], key: str = "us", **kw: Any) -> Row:
    """A row from samples ``key`` of ``found``; the other clock's median goes into ``extra``."""
    samples = found[key]
    other = "cpu_us" if key == "us" else "wall_us"
    extra = kw.pop("extra", {})
    if other in found:
        extra = {other: round(found[other].median, 3), **extra}
    unit = "us" if key == "us" else "us CPU"
    return Row(
        name, what, samples.median, unit, samples.min, list(samples.values), extra=extra, **kw
    )


def inprocess_rows(found: dict[str, dict[str, Samples]], plan: Plan) -> list[Row]:
    verify = found[FLOOR_VERIFY]["us"]
    redis_rt = found[FLOOR_REDIS]["us"]
    floor_v = verify.median
    floor_sum = verify.median + redis_rt.median
    rows = [
        _time_row(
            FLOOR_VERIFY, "raw cryptography ES256 verify (b64 decode + R||S->DER)",
            found[FLOOR_VERIFY],
        ),
        _time_row(
            FLOOR_REDIS, "raw Redis SET NX PX round trip, hand-encoded RESP", found[FLOOR_REDIS]
        ),
        Row(
            FLOOR_SUM, "raw verify + raw Redis round trip", floor_sum, "us",
            verify.min + redis_rt.min,
            extra={"cpu_us": round(
                found[FLOOR_VERIFY]["cpu_us"].median + found[FLOOR_REDIS]["cpu_us"].median, 3
            )},
        ),
        _time_row(
            FLOOR_SEQUENCE, "raw verify then raw SET NX PX, in one loop (diagnosis only)",
            found[FLOOR_SEQUENCE], floor=FLOOR_SUM, floor_value=floor_sum,
            extra={"note": "not a floor of any target; shows what sequencing costs here"},
        ),
    ]  # fmt: skip
    core = {
        "core_memory_warm": (
            "Engine.run_sync, memory store, same key and token", FLOOR_VERIFY, floor_v, 1.3, None
        ),
        "core_memory_cold": (
            "Engine.run_sync, memory store, new key and token every request",
            FLOOR_VERIFY, floor_v, None,
            "no target: two signature checks (proof, token) and a key import per request",
        ),
        "core_redis_sync_warm": (
            "Engine.run_sync, sync Redis store (redis-py), same key and token",
            FLOOR_SUM, floor_sum, 1.4, None,
        ),
    }  # fmt: skip
    warm_jwt = found["core_memory_warm"]["us"].median if "core_memory_warm" in found else None
    core.update({
        "core_introspection_warm": (
            "Engine.run_sync, opaque token, introspection answer cached, same key and token",
            "core_memory_warm", warm_jwt, 1.1, None,
        ),
        "core_introspection_miss": (
            "Engine.run_sync, a new opaque token every request: one RFC 7662 call to a "
            "loopback endpoint (stdlib server) each",
            "core_memory_warm", warm_jwt, None,
            "no target: the cost of a cache miss, dominated by the HTTP round trip",
        ),
    })  # fmt: skip
    for name, (what, floor, value, target, note) in core.items():
        if name in found:
            extra = {"note": note} if note else {}
            rows.append(
                _time_row(
                    name,
                    what,
                    found[name],
                    floor=floor,
                    floor_value=value,
                    target=target,
                    extra=extra,
                )
            )
    rows += observed_rows(found, floor_v)
    conc = plan.asgi_concurrency
    asgi = {
        f"asgi_redis_async_{conc}": (
            f"DPoPMiddleware in-process, {conc} concurrent, async Redis: CPU per request",
            FLOOR_SUM, floor_sum, 1.5,
        ),
        f"asgi_memory_{conc}": (
            f"DPoPMiddleware in-process, {conc} concurrent, memory store: CPU per request",
            FLOOR_VERIFY, floor_v, None,
        ),
    }  # fmt: skip
    for name, (what, floor, value, target) in asgi.items():
        if name in found:
            rps = round(1e6 / found[name]["wall_us"].median, 1)
            rows.append(
                _time_row(
                    name, what, found[name], "cpu_us", floor=floor, floor_value=value,
                    target=target, extra={"rps": rps},
                )
            )  # fmt: skip
    return rows


def observed_rows(found: dict[str, dict[str, Samples]], floor_v: float) -> list[Row]:
    """The observed warm cores and what each adds to ``core_memory_warm``: the median of the
    per-slice differences of CPU time per request. The two rows run slice by slice, one right
    after the other, so each difference compares the same few milliseconds; CPU time leaves out
    the time other processes had the core (the machine is shared); the median of many pairs
    shrugs off the slices a neighbour disturbed. Wall-clock figures are in the notes."""
    warm = found.get("core_memory_warm")
    rows = []
    for name, (what, target) in OBSERVED.items():
        if name not in found or warm is None:
            continue
        rows.append(
            _time_row(
                name, f"Engine.run_sync as core_memory_warm, with {what}", found[name],
                floor=FLOOR_VERIFY, floor_value=floor_v,
            )
        )  # fmt: skip
        mine, base = found[name], warm
        cpu = _paired(mine["slice_cpu_us"], base["slice_cpu_us"])
        wall = _paired(mine["slice_us"], base["slice_us"])
        rows.append(
            Row(
                f"{name}_added",
                f"{what}: CPU per request over core_memory_warm (median of paired slices)",
                statistics.median(cpu), "us", None, [], target=target,
                extra={
                    "pairs": len(cpu),
                    "wall_added_us": round(statistics.median(wall), 3),
                    "note": f"median of {len(cpu)} paired slices, CPU time; wall "
                    f"{statistics.median(wall):+.1f} us",
                },
            )
        )  # fmt: skip
    return rows


def _paired(mine: Samples, base: Samples) -> list[float]:
    return [a - b for a, b in zip(mine.values, base.values, strict=True)]


def http_rows(
    prefix: str, found: dict[str, dict[str, Samples]], floor_sum: float | None, target: float | None
) -> list[Row]:
    rows = []
    plain, dpop = found[f"{prefix}_plain"], found[f"{prefix}_dpop_redis"]
    server = "Starlette under uvicorn" if "starlette" in prefix else "Flask under gunicorn (sync)"
    note = "" if "starlette" in prefix else "sync worker: no keep-alive, one TCP connection each"
    for name, what, samples in (
        (f"{prefix}_plain", f"{server}, 1 worker, no middleware", plain),
        (f"{prefix}_dpop_redis", f"{server}, 1 worker, middleware + Redis store", dpop),
    ):
        extra: dict[str, Any] = {
            "p50_us": round(samples["p50_us"].median, 1),
            "p99_us": round(samples["p99_us"].median, 1),
            "connections_per_round": int(samples["connections"].median),
        }
        if note:
            extra["note"] = note
        rows.append(
            Row(
                name,
                what,
                samples["rps"].median,
                "rps",
                samples["rps"].max,
                list(samples["rps"].values),
                extra=extra,
            )
        )
    added = 1e6 / dpop["rps"].median - 1e6 / plain["rps"].median
    best = 1e6 / dpop["rps"].max - 1e6 / plain["rps"].max
    rows.append(
        Row(
            f"{prefix}_added",
            "cost the middleware adds per request: 1/rps_with - 1/rps_without",
            added, "us", best, floor=FLOOR_SUM, floor_value=floor_sum, target=target,
            extra={"note": "best = from the best round of each"},
        )
    )  # fmt: skip
    return rows


def memory_row(entries: int, mode: str) -> Row:
    command = [sys.executable, "-m", "benchmarks.memory", "--entries", str(entries)]
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    try:
        done = subprocess.run(
            command, cwd=root, env=env, capture_output=True, text=True, check=True, timeout=300
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise BenchmarkError(f"memory benchmark failed: {exc}") from exc
    result = json.loads(done.stdout)
    extra: dict[str, Any] = {
        "entries": result["entries"],
        "rss_bytes_per_entry": result["rss_bytes_per_entry"],
    }
    if mode != "full":
        extra["note"] = f"{mode} mode: {entries:,} entries, not 1,000,000"
    return Row(
        "memory_store_bytes_per_entry",
        "MemoryReplayStore heap per live entry (tracemalloc)",
        result["bytes_per_entry"],
        "bytes",
        target=200,
        extra=extra,
    )


def run(args: argparse.Namespace) -> int:
    from redis import RedisError

    from benchmarks import e2e, inprocess
    from benchmarks.common import redis_cleanup, run_prefix
    from benchmarks.report import document, markdown, table

    plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
    groups = set(args.only or GROUPS)
    progress = Progress()
    meta = _meta(plan, args.redis_url)
    progress(f"mode {plan.mode}, groups {', '.join(sorted(groups))}; {meta['note']}")
    client = Client()
    prefix = run_prefix()
    rows: list[Row] = []
    errors: dict[str, str] = {}
    floor_sum: float | None = None
    try:
        progress("in-process rows (floors, core, ASGI), interleaved")
        benches = inprocess.build(plan, client, args.redis_url, prefix, groups)
        try:
            found = inprocess.run_interleaved(benches, plan.rounds, progress)
            rows += inprocess_rows(found, plan)
            floor_sum = next(r.value for r in rows if r.name == FLOOR_SUM)
        except BenchmarkError as exc:
            errors["in-process"] = str(exc)
        finally:
            for bench in benches:
                try:
                    bench.close()
                except Exception as exc:  # keep closing the others; the run goes on
                    progress(f"closing {bench.name} failed: {type(exc).__name__}: {exc}")

        if "http" in groups:
            settings = client.settings(replay_store={"url": args.redis_url, "key_prefix": prefix})
            for framework, target in ((e2e.STARLETTE, 1.6), (e2e.FLASK, None)):
                progress(f"{framework.name}: starting servers")
                try:
                    found = e2e.measure(framework, plan, client, settings, progress)
                except BenchmarkError as exc:
                    errors[framework.name] = str(exc)
                    continue
                rows += http_rows(framework.name, found, floor_sum, target)

        if "memory" in groups:
            progress(f"memory store, {plan.memory_entries:,} entries")
            try:
                rows.append(memory_row(plan.memory_entries, plan.mode))
            except BenchmarkError as exc:
                errors["memory_store_bytes_per_entry"] = str(exc)
    finally:
        try:
            deleted = redis_cleanup(args.redis_url, prefix)
            progress(f"deleted {deleted} Redis keys under {prefix}")
        except (RedisError, OSError) as exc:
            progress(f"could not delete Redis keys under {prefix} (they expire anyway): {exc}")

    meta["load_average_end"] = list(os.getloadavg())
    meta["duration_s"] = round(time.perf_counter() - progress.start, 1)
    order = {name: i for i, name in enumerate(row_names(plan))}
    rows.sort(key=lambda r: order.get(r.name, len(order)))

    print()
    print(f"python -m benchmarks{' --' + plan.mode if plan.mode != 'full' else ''}: "
          f"{meta['python']}, {meta['cryptography']}, {meta['redis_server']}, {meta['uvicorn']}")  # fmt: skip
    print(f"note: {meta['note']}")
    la0, la1 = meta["load_average_start"][0], meta["load_average_end"][0]
    print(f"load average (1 min) {la0:.2f} at start, {la1:.2f} at end; took {meta['duration_s']} s")
    print()
    print(table(rows, errors))
    for name, message in errors.items():
        print(f"\nERROR {name}: {message}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(document(rows, errors, meta), indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows) + "\n")
    return 1 if errors else 0


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # so that servers are stopped and keys deleted on SIGTERM too


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        return run(args)
    except BenchmarkError as exc:
        print(f"benchmarks: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("benchmarks: interrupted (servers stopped, Redis keys deleted)", file=sys.stderr)
        return 130
