"""``python -m benchmarks.overhead [--in-context]``: the Python work of a warm core request.

Diagnosis, not a row of the table; the same ``Engine.run_sync`` with the memory store as
``core_memory_warm``.

* By default the proof key's signature check is replaced by one that returns True, so what is
  left is everything the middleware does around the ES256 verify, in a tight loop with nothing
  evicting its caches between requests.
* ``--in-context`` keeps the real verify, times it inside each request, and alternates slices of
  requests with slices of the raw verify floor: per round it prints the floor, the request, the
  verify inside the request and the rest (the Python work next to a real verify).

Times are microseconds per request.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

from benchmarks.common import Client
from benchmarks.inprocess import ES256Floor, request_info
from dpop_middleware.core.keys import ProofKey
from dpop_middleware.flow import Engine
from dpop_middleware.replay.memory import MemoryReplayStore
from dpop_middleware.settings import Settings


def _always_valid(data: bytes, signature: bytes) -> bool:
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__)
    parser.add_argument("--n", type=int, default=5000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--in-context", action="store_true", help="keep and time the real verify")
    args = parser.parse_args(argv)

    client = Client()
    engine = Engine(Settings.from_dict(client.settings()))
    store = MemoryReplayStore()
    parser_ = engine.verifier._proofs
    real = parser_._header(client.proofs(1)[0].split(".")[0])
    inside = [0.0]
    clock = time.perf_counter

    def timed_verify(data: bytes, signature: bytes) -> bool:
        start = clock()
        valid = real.verify(data, signature)
        inside[0] += clock() - start
        return valid

    key = ProofKey(real.alg, real.jkt, timed_verify if args.in_context else _always_valid)
    parser_._header = lambda segment: key  # type: ignore[method-assign]
    floor = ES256Floor(client, args.n)
    slices = 8

    per_round = []
    for _ in range(args.rounds):
        work = [request_info(client.token, proof) for proof in client.proofs(args.n)]
        inside[0] = spent = floor_spent = 0.0
        gc.collect()
        for index in range(slices if args.in_context else 1):
            part = work[args.n * index // slices : args.n * (index + 1) // slices]
            if args.in_context:
                start = clock()
                floor.execute(range(len(part)))
                floor_spent += clock() - start
            else:
                part = work
            start = clock()
            for request in part:
                outcome = engine.run_sync(request, store)
                if outcome.refusal is not None:
                    print(f"refused: {outcome.refusal.error.reason}", file=sys.stderr)
                    return 1
            spent += clock() - start
        request_us, verify_us = spent / args.n * 1e6, inside[0] / args.n * 1e6
        per_round.append(request_us)
        if args.in_context:
            floor_us = floor_spent / args.n * 1e6
            print(
                f"floor {floor_us:6.1f}  request {request_us:6.1f}  verify inside {verify_us:6.1f}"
                f"  rest {request_us - verify_us:5.1f}  ratio {request_us / floor_us:.3f}"
            )
    if not args.in_context:
        print(
            f"Python work per warm core request, verify stubbed out: best {min(per_round):.2f} "
            f"us, median {statistics.median(per_round):.2f} us ({args.rounds} rounds of {args.n})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
