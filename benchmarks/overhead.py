"""``python -m benchmarks.overhead``: the Python work of a warm core request, verify stubbed out.

Diagnosis, not a row of the table: the same ``Engine.run_sync`` with the memory store as
``core_memory_warm``, but the proof key's signature check replaced by one that returns True, so
what is left is everything the middleware does around the ES256 verify. It runs in a tight loop,
with nothing evicting its caches between requests; next to a real verify the same work costs
more (see the README's performance section). Prints the best and the median round, in
microseconds per request.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

from benchmarks.common import Client
from benchmarks.inprocess import request_info
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
    args = parser.parse_args(argv)

    client = Client()
    engine = Engine(Settings.from_dict(client.settings()))
    store = MemoryReplayStore()
    parser_ = engine.verifier._proofs
    header = client.proofs(1)[0].split(".")[0]
    real = parser_._header(header)
    stub = ProofKey(real.alg, real.jkt, _always_valid)
    parser_._header = lambda segment: stub  # type: ignore[method-assign]

    per_round = []
    for _ in range(args.rounds):
        work = [request_info(client.token, proof) for proof in client.proofs(args.n)]
        gc.collect()
        start = time.perf_counter()
        for request in work:
            outcome = engine.run_sync(request, store)
            if outcome.refusal is not None:
                print(f"refused: {outcome.refusal.error.reason}", file=sys.stderr)
                return 1
        per_round.append((time.perf_counter() - start) / args.n * 1e6)
    print(
        f"Python work per warm core request, verify stubbed out: best {min(per_round):.2f} us, "
        f"median {statistics.median(per_round):.2f} us ({args.rounds} rounds of {args.n})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
