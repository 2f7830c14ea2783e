"""A bounded HTTP/1.1 load generator: ``python -m benchmarks.loadgen --requests FILE ...``.

Standard library only, one thread, raw sockets and ``selectors``: ``--concurrency`` connections,
each with one request in flight, keep-alive when the server allows it (a ``Connection: close``
answer, as gunicorn's sync worker gives, makes that connection reconnect for its next request).
Every request of the file is sent exactly once, in order (each carries a proof that may be used
once). It stops at ``--time-limit`` seconds whatever happens and writes a JSON summary: completed
requests, statuses, errors, requests/s, and latency percentiles (from sending, or connecting when
the connection is new, to the last byte of the response).
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys
import time
from dataclasses import dataclass, field


@dataclass
class _Conn:
    sock: socket.socket | None = None
    buffer: bytearray = field(default_factory=bytearray)
    started: float = 0.0
    header_end: int = -1
    status: int = 0
    length: int | None = None
    close: bool = False


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def run(
    host: str, port: int, requests: list[bytes], concurrency: int, time_limit: float
) -> dict[str, object]:
    deadline = time.perf_counter() + time_limit
    selector = selectors.DefaultSelector()
    conns = [_Conn() for _ in range(min(concurrency, len(requests)))]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []
    next_index = 0
    reconnects = 0
    in_flight = 0

    def connect(conn: _Conn) -> None:
        nonlocal reconnects
        sock = socket.create_connection((host, port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sock = sock
        reconnects += 1
        selector.register(sock, selectors.EVENT_READ, conn)

    def drop(conn: _Conn) -> None:
        if conn.sock is not None:
            selector.unregister(conn.sock)
            conn.sock.close()
            conn.sock = None

    def send_next(conn: _Conn) -> None:
        nonlocal next_index, in_flight
        if next_index >= len(requests):
            drop(conn)
            return
        data = requests[next_index]
        next_index += 1
        conn.started = time.perf_counter()
        conn.buffer.clear()
        conn.header_end = -1
        conn.length = None
        conn.close = False
        try:
            if conn.sock is None:
                connect(conn)
            assert conn.sock is not None
            conn.sock.sendall(data)
        except OSError as exc:
            errors.append(f"send: {exc}")
            drop(conn)
            return
        in_flight += 1

    def finish(conn: _Conn) -> None:
        nonlocal in_flight
        in_flight -= 1
        latencies.append(time.perf_counter() - conn.started)
        statuses[conn.status] = statuses.get(conn.status, 0) + 1
        if conn.close:
            drop(conn)
        send_next(conn)

    def parse_head(conn: _Conn) -> bool:
        end = conn.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(conn.buffer[:end]).decode("latin-1").split("\r\n")
        conn.header_end = end + 4
        conn.status = int(head[0].split(" ", 2)[1])
        for line in head[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                conn.length = int(value.strip())
            elif name == "connection" and value.strip().lower() == "close":
                conn.close = True
            elif name == "transfer-encoding":
                raise ValueError("chunked responses are not supported by this load generator")
        if conn.length is None:
            conn.close = True  # the body runs until the server closes
        return True

    start = time.perf_counter()
    for conn in conns:
        send_next(conn)
    timed_out = False
    while in_flight:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            timed_out = True
            break
        for key, _ in selector.select(timeout=min(remaining, 1.0)):
            conn = key.data
            assert conn.sock is not None
            try:
                chunk = conn.sock.recv(65536)
            except OSError as exc:
                errors.append(f"recv: {exc}")
                in_flight -= 1
                drop(conn)
                send_next(conn)
                continue
            if chunk:
                conn.buffer += chunk
            if conn.header_end < 0 and not parse_head(conn):
                if not chunk:
                    errors.append("connection closed before a response")
                    in_flight -= 1
                    drop(conn)
                    send_next(conn)
                continue
            body = len(conn.buffer) - conn.header_end
            if conn.length is not None and body >= conn.length:
                finish(conn)
            elif not chunk:
                if conn.length is None:
                    finish(conn)  # closed-delimited body: complete now
                else:
                    errors.append("connection closed mid-body")
                    in_flight -= 1
                    drop(conn)
                    send_next(conn)
    elapsed = time.perf_counter() - start
    for conn in conns:
        drop(conn)
    selector.close()
    latencies.sort()
    done = len(latencies)
    return {
        "sent": next_index,
        "completed": done,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": len(errors),
        "first_errors": errors[:5],
        "timed_out": timed_out,
        "elapsed_s": elapsed,
        "connections_opened": reconnects,
        "rps": done / elapsed if elapsed > 0 else 0.0,
        "p50_us": _percentile(latencies, 0.50) * 1e6,
        "p99_us": _percentile(latencies, 0.99) * 1e6,
        "max_us": (latencies[-1] if latencies else float("nan")) * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--requests", required=True, help="JSON list of raw requests (latin-1)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=30.0)
    parser.add_argument("--out", required=True, help="where to write the JSON summary")
    args = parser.parse_args(argv)
    with open(args.requests, encoding="utf-8") as file:
        requests = [r.encode("latin-1") for r in json.load(file)]
    summary = run(args.host, args.port, requests, args.concurrency, args.time_limit)
    with open(args.out, "w", encoding="utf-8") as file:
        json.dump(summary, file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
