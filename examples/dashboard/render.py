"""Render ``docs/images/dashboard.png``: the Grafana dashboard's panels, computed from metrics
scraped over HTTP from the demo API under a bounded load on loopback.

    .venv/bin/pip install matplotlib        # not a dependency of the project
    .venv/bin/python -m examples.dashboard.render [--seconds 40] [--rps 120] [--out PATH]

What runs: the demo API (``dpop_middleware.demo.build_app``) with ``metrics`` on and a Redis
replay store (a private ``redis-server`` on a free port; the memory store if there is none),
``/metrics`` served beside it, under uvicorn on 127.0.0.1. Client threads send a mix of
requests for ``--seconds`` at about ``--rps`` in all: honest clients with a spread of clock
skews, replays, wrong ``htm``, missing proofs, expired tokens, Bearer tokens. A third of the way
in, Redis is stopped for a few seconds (503s and ``dpop_replay_store_errors_total``), then
started again. ``/metrics`` is scraped every second; each panel applies the same expression as
``examples/dashboard/grafana-dashboard.json`` (``rate`` over the scrape interval,
``histogram_quantile`` with Prometheus' interpolation).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, make_asgi_app
from prometheus_client.parser import text_string_to_metric_families

from dpop_middleware.demo import build_app
from dpop_middleware.testing import DPoPKey, TokenIssuer, serve

Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]
ROOT = Path(__file__).resolve().parents[2]


class PrivateRedis:
    """A throwaway redis-server on a free port, stoppable and restartable on the same port."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        self.dir = tempfile.mkdtemp(prefix="dpop-dashboard-redis-")
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.binary is not None
        command = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                   "--appendonly", "no", "--dir", self.dir, "--logfile", ""]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                import redis

                redis.Redis.from_url(self.url, socket_timeout=0.2).ping()
                return
            except Exception:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(5)
            self.process = None


def with_metrics(app: Any, registry: CollectorRegistry) -> Any:
    metrics = make_asgi_app(registry=registry)

    async def router(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/metrics":
            await metrics(scope, receive, send)
        else:
            await app(scope, receive, send)

    return router


def scrape(client: httpx.Client, url: str) -> Scrape:
    out: Scrape = {}
    for family in text_string_to_metric_families(client.get(url).text):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def load(base: str, issuer: TokenIssuer, stop: threading.Event, rps: float, seed: int) -> None:
    """One client thread: about ``rps`` requests a second until ``stop``."""
    rng = random.Random(seed)
    url = f"{base}/items"
    keys = [DPoPKey.generate() for _ in range(4)]
    # Client clocks: most within a second or two, some a few seconds ahead or behind.
    skews = [rng.gauss(0, 1.2) for _ in keys[:-1]] + [rng.choice((-7.0, 6.0))]
    tokens = [issuer.token(bound_to=k) for k in keys]
    expired = issuer.token(bound_to=keys[0], claims={"exp": int(time.time()) - 600})
    last: dict[str, str] | None = None
    with httpx.Client(timeout=5) as client:
        while not stop.is_set():
            i = rng.randrange(len(keys))
            key, token = keys[i], tokens[i]
            iat = time.time() + skews[i] + rng.uniform(-0.3, 0.3)
            roll = rng.random()
            headers = {"Authorization": f"DPoP {token}"}
            if roll < 0.80:
                headers["DPoP"] = key.proof("GET", url, access_token=token, iat=int(iat))
            elif roll < 0.86 and last is not None:
                headers = last  # a replay
            elif roll < 0.90:
                headers["DPoP"] = key.proof("POST", url, access_token=token)
            elif roll < 0.93:
                pass  # no proof
            elif roll < 0.96:
                headers = {"Authorization": f"DPoP {expired}",
                           "DPoP": keys[0].proof("GET", url, access_token=expired)}  # fmt: skip
            else:
                headers = {"Authorization": f"Bearer {token}"}
            with contextlib.suppress(httpx.HTTPError):
                client.get(url, headers=headers)
            last = headers if "DPoP" in headers else last
            stop.wait(rng.expovariate(rps))


def rate(series: list[tuple[float, Scrape]], name: str, match: Callable[[dict[str, str]], bool],
         by: tuple[str, ...] = ()) -> dict[tuple[str, ...], list[float]]:  # fmt: skip
    """``sum by (by) (rate(name{match}[interval]))`` between consecutive scrapes."""
    out: dict[tuple[str, ...], list[float]] = {}
    for n, ((t0, a), (t1, b)) in enumerate(itertools.pairwise(series)):
        for (sample, labels), value in b.items():
            d = dict(labels)
            if sample != name or not match(d):
                continue
            group = tuple(d.get(k, "") for k in by)
            row = out.setdefault(group, [0.0] * (len(series) - 1))
            row[n] += max(0.0, value - a.get((sample, labels), 0.0)) / (t1 - t0)
    return out


def quantile(q: float, series: list[tuple[float, Scrape]], name: str) -> list[float]:
    """``histogram_quantile(q, sum by (le) (rate(name_bucket[interval])))``."""
    buckets = rate(series, f"{name}_bucket", lambda d: True, ("le",))
    bounds = sorted(buckets, key=lambda g: float(g[0]))
    out = []
    for n in range(len(series) - 1):
        cumulative = [(float(b[0]), buckets[b][n]) for b in bounds]
        total = cumulative[-1][1]
        if total <= 0:
            out.append(float("nan"))
            continue
        rank = q * total
        lower_bound, lower_count = (0.0 if cumulative[0][0] > 0 else cumulative[0][0]), 0.0
        value = cumulative[-2][0]
        for bound, count in cumulative:
            if count >= rank:
                if bound == float("inf"):
                    value = cumulative[-2][0]
                elif count == lower_count:
                    value = bound
                else:
                    value = lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                        count - lower_count
                    )
                break
            lower_bound, lower_count = bound, count
        out.append(value)
    return out


def plot(series: list[tuple[float, Scrape]], out: Path, note: str, outage: tuple[float, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = series[0][0]
    xs = [t - t0 for t, _ in series[1:]]
    fig, axes = plt.subplots(4, 2, figsize=(15, 14), constrained_layout=True)
    fig.suptitle(f"DPoP middleware (examples/dashboard/grafana-dashboard.json): {note}", fontsize=12)
    ax = list(axes.flat)
    judged = lambda d: d["outcome"] in ("accepted", "refused", "would_refuse")  # noqa: E731
    req = "dpop_requests_total"
    acc = rate(series, req, lambda d: d["outcome"] == "accepted").get((), [0.0] * len(xs))
    allj = rate(series, req, judged).get((), [0.0] * len(xs))
    ax[0].plot(xs, [100 * a / b if b else float("nan") for a, b in zip(acc, allj, strict=True)])
    ax[0].set(title="Accept rate (accepted / verified)", ylabel="%", ylim=(0, 100))
    by_outcome = rate(series, req, lambda d: True, ("outcome",))
    labels = sorted(by_outcome)
    ax[1].stackplot(xs, *[by_outcome[g] for g in labels], labels=[g[0] for g in labels])
    ax[1].set(title="Requests by outcome", ylabel="req/s")
    ax[1].legend(loc="upper left", fontsize=8)
    refusals = rate(series, req, lambda d: d["outcome"] in ("refused", "would_refuse"),
                    ("reason", "status"))  # fmt: skip
    labels = sorted(refusals, key=lambda g: -sum(refusals[g]))
    ax[2].stackplot(xs, *[refusals[g] for g in labels], labels=[f"{r} ({s})" for r, s in labels])
    ax[2].set(title="Refusals by reason", ylabel="req/s")
    ax[2].legend(loc="upper left", fontsize=8, ncol=2)
    for q in (0.5, 0.99):
        ax[3].plot(xs, [v * 1e3 for v in quantile(q, series, "dpop_verify_seconds")], label=f"p{int(q * 100)}")
        ax[4].plot(xs, [v * 1e3 for v in quantile(q, series, "dpop_replay_store_seconds")], label=f"p{int(q * 100)}")
    ax[3].set(title="Middleware time per request (p50, p99)", ylabel="ms")
    ax[4].set(title="Replay store latency (p50, p99)", ylabel="ms")
    errors = rate(series, "dpop_replay_store_errors_total", lambda d: True, ("store",))
    for group, values in errors.items():
        ax[5].plot(xs, values, label=group[0], color="tab:red")
    ax[5].set(title="Replay store errors (each one a 503)", ylabel="errors/s")
    for q in (0.05, 0.5, 0.95):
        ax[6].plot(xs, quantile(q, series, "dpop_proof_iat_offset_seconds"), label=f"p{int(q * 100)}")
    ax[6].axhline(0, color="grey", lw=0.5)
    ax[6].set(title="Client clock skew: proof iat - server clock (p5, p50, p95)", ylabel="s")
    jwks = rate(series, "dpop_jwks_fetch_total", lambda d: True, ("result",))
    nonces = rate(series, "dpop_nonce_issued_total", lambda d: True).get((), [0.0] * len(xs))
    for group, values in sorted(jwks.items()):
        ax[7].plot(xs, values, label=f"jwks {group[0]}")
    ax[7].plot(xs, nonces, label="nonces issued")
    ax[7].set(title="Issuer fetches and nonces", ylabel="per s")
    for a in ax:
        a.set_xlabel("seconds into the run")
        a.grid(alpha=0.3)
        if a is not ax[1] and a is not ax[2] and a.get_legend_handles_labels()[0]:
            a.legend(loc="upper right", fontsize=8)
        a.axvspan(*outage, color="tab:red", alpha=0.08)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--rps", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "dashboard.png")
    args = parser.parse_args()

    import logging

    logging.getLogger("dpop_middleware").addHandler(logging.NullHandler())
    logging.getLogger("dpop_middleware").propagate = False  # the refusal lines: not here
    redis_server = PrivateRedis() if shutil.which("redis-server") else None
    if redis_server is not None:
        redis_server.start()
    issuer = TokenIssuer()
    registry = CollectorRegistry()
    store: Any = {"url": redis_server.url, "timeout": 0.2} if redis_server else "memory://"
    app = with_metrics(build_app(issuer.settings(metrics={"registry": registry}, replay_store=store)), registry)
    series: list[tuple[float, Scrape]] = []
    stop = threading.Event()
    outage = (args.seconds / 3, args.seconds / 3 + 5)
    try:
        with serve(app) as base, httpx.Client() as scraper:
            threads = [
                threading.Thread(target=load, args=(base, issuer, stop, args.rps / args.threads, n))
                for n in range(args.threads)
            ]
            start = time.monotonic()
            for thread in threads:
                thread.start()
            down = False
            while (elapsed := time.monotonic() - start) < args.seconds:
                series.append((time.monotonic(), scrape(scraper, f"{base}/metrics")))
                if redis_server is not None and not down and elapsed >= outage[0]:
                    redis_server.stop()
                    down = True
                elif redis_server is not None and down and redis_server.process is None and elapsed >= outage[1]:
                    redis_server.start()
                time.sleep(1.0)
            stop.set()
            for thread in threads:
                thread.join()
            series.append((time.monotonic(), scrape(scraper, f"{base}/metrics")))
    finally:
        if redis_server is not None:
            redis_server.stop()
    total = sum(v for (name, _), v in series[-1][1].items() if name == "dpop_requests_total")
    note = (f"demo API under {args.threads} client threads for {args.seconds:g} s, {total:,.0f} requests, "
            f"{'Redis' if redis_server else 'memory'} replay store stopped for 5 s (red band)")  # fmt: skip
    plot(series, args.out, note, outage)
    print(f"wrote {args.out} ({len(series)} scrapes, {total:,.0f} requests)")


if __name__ == "__main__":
    main()
