"""Admission decision latency against a real redis-server on loopback.

    python -m bench.admission --requests 20000 --concurrency 1,32

One decision = one EVALSHA of the admission script over a key's request and token buckets
(plus an org bucket), through the worker's own pipelined client. Reports p50/p99/max per
concurrency level and the client-side CPU per decision. Bounded by --requests.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time

from apirouter.keys import KeyRecord, Tier
from apirouter.table import Limits
from tests.harness import RedisServer
from workers.admission import Admission


async def run(url: str, requests: int, concurrency: int) -> dict[str, float]:
    admission = Admission()
    limits = Limits(1 << 20, 30.0, 1.0, 8, 30.0, 3, url, 1000.0, "closed", 256, 1)
    key = KeyRecord(f"bench-{concurrency}", "d" * 64, "bench", "", frozenset({"inference"}),
                    "t", Tier(10**9, 10**9, 10**12, 10**12), False)
    org = Tier(10**9, 10**9, 0, 0)
    await admission.admit(limits, key, "m", 100, org, None)  # connect, load the script
    latencies: list[float] = []
    per_worker = requests // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            t0 = time.perf_counter()
            ticket = await admission.admit(limits, key, "m", 100, org, None)
            latencies.append(time.perf_counter() - t0)
            assert ticket.verdict.allowed

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    latencies.sort()
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    n = len(latencies)
    return {"concurrency": concurrency, "decisions": n,
            "p50_ms": latencies[n // 2] * 1000, "p99_ms": latencies[int(n * 0.99)] * 1000,
            "max_ms": latencies[-1] * 1000, "cpu_us": cpu / n * 1e6}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.admission", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--concurrency", default="1,32")
    args = p.parse_args()
    redis = RedisServer()
    import uvloop

    try:
        rows = [uvloop.run(run(redis.url, args.requests, int(c)))
                for c in args.concurrency.split(",")]
    finally:
        redis.stop()
        redis.cleanup()
    print(f"\n{'conc':>5} {'decisions':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'client CPU us':>13}")
    for r in rows:
        print(f"{r['concurrency']:>5} {r['decisions']:>9} {r['p50_ms']:>8.3f} "
              f"{r['p99_ms']:>8.3f} {r['max_ms']:>8.3f} {r['cpu_us']:>13.1f}")


if __name__ == "__main__":
    main()
