"""The end-to-end rows: real servers on loopback, loaded by a separate process.

For each framework both servers (without and with the middleware) run at once, each one worker
on 127.0.0.1 on a free port, and are loaded in alternating order round by round (plain, DPoP, then
DPoP, plain, ...) so that drift in the machine's load falls on both alike. Every DPoP request
carries a proof signed just before its round and used once; the plain server gets requests of the
same shape (the same headers, from a small pool of proofs it never looks at).

Servers are stopped (their whole process group: SIGTERM, then SIGKILL after 10 s) when the rows
end, also on an error or Ctrl-C; the load generator runs under a hard time limit of its own and is
killed by ``subprocess.run`` if it overstays that by 30 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.apps import SETTINGS_ENV
from benchmarks.common import BenchmarkError, Client, Plan, Samples

ROOT = Path(__file__).resolve().parent.parent
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Framework:
    name: str  # row prefix
    plain: str  # app spec
    dpop: str

    def command(self, app: str, port: int) -> list[str]:
        if self.name.endswith("uvicorn"):
            return [
                sys.executable, "-m", "uvicorn", "--factory", app,
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                "--log-level", "warning", "--no-access-log",
            ]  # fmt: skip
        return [
            sys.executable, "-m", "gunicorn", "--workers", "1", "--worker-class", "sync",
            "--bind", f"127.0.0.1:{port}", "--log-level", "warning", "--no-control-socket",
            app,
        ]  # fmt: skip


STARLETTE = Framework(
    "http_starlette_uvicorn", "benchmarks.apps:starlette_plain", "benchmarks.apps:starlette_dpop"
)
FLASK = Framework(
    "http_flask_gunicorn", "benchmarks.apps:flask_plain()", "benchmarks.apps:flask_dpop()"
)


def uvicorn_flavour() -> str:
    """Which event loop and HTTP parser uvicorn's ``auto`` picks in this environment."""
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"uvicorn loop={loop} http={http}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"GET /items HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return sock.recv(16).startswith(b"HTTP/1.")
    except OSError:
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a server this module started, and its workers (its own process group)."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def server(
    label: str, command: Callable[[int], list[str]], env: dict[str, str], log: Path
) -> Iterator[int]:
    """Start a server on a free loopback port; yield the port; always stop it."""
    for _attempt in range(3):
        port = free_port()
        with open(log, "ab") as out:
            process = subprocess.Popen(
                command(port),
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped with its workers
            )
        try:
            deadline = time.monotonic() + _START_TIMEOUT
            while not _answers(port):
                if process.poll() is not None:
                    break  # died (perhaps the port was taken meanwhile): try another port
                if time.monotonic() > deadline:
                    raise BenchmarkError(f"{label} did not start in {_START_TIMEOUT} s")
                time.sleep(0.05)
            else:
                yield port
                return
        finally:
            _stop(process)
    tail = log.read_text(errors="replace")[-2000:]
    raise BenchmarkError(f"{label} failed to start:\n{tail}")


def raw_request(port: int, token: str, proof: str) -> str:
    return (
        f"GET /items HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: dpop-bench/1\r\n"
        f"Accept: */*\r\nAuthorization: DPoP {token}\r\nDPoP: {proof}\r\n\r\n"
    )


def load(
    port: int, requests: list[str], plan: Plan, work: Path, env: dict[str, str]
) -> dict[str, Any]:
    """Run the load generator once over ``requests``; its JSON summary."""
    request_file = work / "requests.json"
    out = work / "result.json"
    request_file.write_text(json.dumps(requests), encoding="utf-8")
    out.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "benchmarks.loadgen", "--port", str(port),
        "--requests", str(request_file), "--concurrency", str(plan.http_concurrency),
        "--time-limit", str(plan.http_time_limit), "--out", str(out),
    ]  # fmt: skip
    try:
        subprocess.run(command, cwd=ROOT, env=env, check=True, timeout=plan.http_time_limit + 30)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise BenchmarkError(f"load generator failed: {exc}") from exc
    result: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return result


def _check(result: dict[str, Any], expected: int, what: str) -> None:
    problems = []
    if result["timed_out"]:
        problems.append(f"hit the {result['elapsed_s']:.0f} s time limit")
    if result["completed"] != expected:
        problems.append(f"{result['completed']}/{expected} completed")
    if set(result["statuses"]) != {"200"}:
        problems.append(f"statuses {result['statuses']}")
    if result["errors"]:
        problems.append(f"{result['errors']} errors {result['first_errors']}")
    if problems:
        raise BenchmarkError(f"{what}: " + "; ".join(problems))


def measure(
    framework: Framework,
    plan: Plan,
    client: Client,
    settings: dict[str, Any],
    progress: Callable[[str], None],
) -> dict[str, dict[str, Samples]]:
    """Rows ``<framework>_plain`` and ``<framework>_dpop_redis``: rps, p50_us, p99_us samples."""
    plain_name, dpop_name = f"{framework.name}_plain", f"{framework.name}_dpop_redis"
    samples: dict[str, dict[str, Samples]] = {plain_name: {}, dpop_name: {}}
    with tempfile.TemporaryDirectory(prefix="dpop-bench-") as tmp:
        work = Path(tmp)
        settings_file = work / "settings.json"
        settings_file.write_text(json.dumps(settings), encoding="utf-8")
        env = dict(os.environ, PYTHONPATH=str(ROOT), **{SETTINGS_ENV: str(settings_file)})
        log = work / "server.log"
        try:
            with contextlib.ExitStack() as stack:
                plain_port = stack.enter_context(
                    server(plain_name, lambda p: framework.command(framework.plain, p), env, log)
                )
                dpop_port = stack.enter_context(
                    server(dpop_name, lambda p: framework.command(framework.dpop, p), env, log)
                )
                # Requests for the plain server: the same shape, from a pool of proofs.
                pool = client.proofs(32, f"http://127.0.0.1:{plain_port}/items")

                def plain(n: int) -> list[str]:
                    return [
                        raw_request(plain_port, client.token, pool[i % len(pool)]) for i in range(n)
                    ]

                def dpop(n: int) -> list[str]:
                    url = f"http://127.0.0.1:{dpop_port}/items"
                    return [raw_request(dpop_port, client.token, p) for p in client.proofs(n, url)]

                targets = {plain_name: (plain_port, plain), dpop_name: (dpop_port, dpop)}
                for name, (port, make) in targets.items():
                    _check(load(port, make(plan.http_warmup), plan, work, env),
                           plan.http_warmup, f"{name} warm-up")  # fmt: skip
                for index in range(plan.http_rounds):
                    progress(f"{framework.name} round {index + 1}/{plan.http_rounds}")
                    order = list(targets) if index % 2 == 0 else list(targets)[::-1]
                    for name in order:
                        port, make = targets[name]
                        result = load(port, make(plan.http_n), plan, work, env)
                        _check(result, plan.http_n, name)
                        for key in ("rps", "p50_us", "p99_us"):
                            samples[name].setdefault(key, Samples()).add(result[key])
                        samples[name].setdefault("connections", Samples()).add(
                            result["connections_opened"]
                        )
        except BenchmarkError as exc:
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise BenchmarkError(f"{exc}\nserver log tail:\n{tail}" if tail else str(exc)) from exc
    return samples
