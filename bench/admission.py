"""Admission cost: decision latency against a real redis-server on loopback (prompt, and made
late on purpose), and the in-process limiter's cost per admission.

    python -m bench.admission --requests 20000 --concurrency 1,32

Redis rows: one decision = one admission script call over a key's request and token buckets
plus an org bucket, through the worker's own pipelined client, at the default settings
(``redis_timeout_ms``, policy ``open``). ``paused`` rows run the same while another client
sends ``CLIENT PAUSE 8 ALL`` every 25 ms (a busy or failing-over Redis; paused clients only
resume on Redis's 100 ms cron tick, so it answers in bursts): the latency that waiting for
Redis's own answer costs, --paused-rounds decisions per client; ``policy`` counts decisions
the failure policy made instead of Redis (each one an admission Redis never counted). CPU is
this process's CPU per decision (the router worker's share of admission), Redis CPU
redis-server's.

In-process rows: ``Admission.admit`` without Redis, one process, the same three buckets;
``shared`` on a bucket segment attached as workers attach it (the supervisor's), and
``shared x2`` with a second process admitting on the same key at the same time (the stripe
lock contended). Bounded by --requests.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import socket
import threading
import time
import uuid
from typing import Any

from apirouter.keys import KeyRecord, Tier
from apirouter.table import Limits
from tests.harness import HOST, RedisServer
from workers.admission import Admission

ORG = Tier(10**9, 10**9, 0, 0)


def _key(name: str) -> KeyRecord:
    return KeyRecord(name, "d" * 64, "bench", "", frozenset({"inference"}), "t",
                     Tier(10**9, 10**9, 10**12, 10**12), False)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def redis_cpu(pid: int) -> float:
    """redis-server's CPU seconds so far (its threads' schedstat run time)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


async def run_redis(url: str, requests: int, concurrency: int, redis_pid: int
                    ) -> dict[str, float]:
    admission = Admission()
    limits = Limits(1 << 20, 30.0, 1.0, 8, 30.0, 3, redis_url=url)  # defaults otherwise
    key = _key(f"bench-{concurrency}-{uuid.uuid4().hex[:6]}")
    await admission.admit(limits, key, "m", 100, ORG, None)  # connect, load the script
    latencies: list[float] = []
    policy = 0
    per_worker = requests // concurrency

    async def worker() -> None:
        nonlocal policy
        for _ in range(per_worker):
            t0 = time.perf_counter()
            ticket = await admission.admit(limits, key, "m", 100, ORG, None)
            latencies.append(time.perf_counter() - t0)
            policy += not ticket.charged

    cpu0, rcpu0 = _cpu(), redis_cpu(redis_pid)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, rcpu = _cpu() - cpu0, redis_cpu(redis_pid) - rcpu0
    latencies.sort()
    n = len(latencies)
    return {"concurrency": concurrency, "decisions": n, "policy": policy,
            "p50_ms": latencies[n // 2] * 1000, "p99_ms": latencies[int(n * 0.99)] * 1000,
            "max_ms": latencies[-1] * 1000, "cpu_us": cpu / n * 1e6,
            "redis_cpu_us": rcpu / n * 1e6}


class Pauser(threading.Thread):
    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.done = threading.Event()

    def run(self) -> None:
        with socket.create_connection((HOST, self.port)) as s:
            while not self.done.wait(0.025):
                s.sendall(b"*4\r\n$6\r\nCLIENT\r\n$5\r\nPAUSE\r\n$1\r\n8\r\n$3\r\nALL\r\n")
                s.recv(64)


def local_cost(requests: int, name: str) -> float:
    """CPU µs per in-process admission (``name``: the bucket segment; "" for a private one)."""
    if name:
        os.environ["APIROUTER_BUCKETS_SHM"] = name
    else:
        os.environ.pop("APIROUTER_BUCKETS_SHM", None)

    async def go() -> float:
        admission = Admission()
        limits = Limits(1 << 20, 30.0, 1.0, 8, 30.0, 3)
        key = _key("bench-local")
        await admission.admit(limits, key, "m", 100, ORG, None)
        cpu0 = _cpu()
        for _ in range(requests):
            await admission.admit(limits, key, "m", 100, ORG, None)
        return (_cpu() - cpu0) / requests * 1e6

    import uvloop

    return uvloop.run(go())


def _local_child(requests: int, name: str, out: Any) -> None:
    out.put(local_cost(requests, name))


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.admission", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--concurrency", default="1,32")
    p.add_argument("--paused-rounds", type=int, default=200,
                   help="decisions per client while Redis is paused (each waits ~100 ms)")
    args = p.parse_args()
    import uvloop

    redis = RedisServer()
    rows: list[tuple[str, dict[str, float]]] = []
    try:
        for c in args.concurrency.split(","):
            rows.append(("prompt", uvloop.run(run_redis(redis.url, args.requests, int(c),
                                                        redis.pid))))
        pauser = Pauser(redis.port)
        pauser.start()
        try:  # a paused Redis answers every ~100 ms (its clients resume on its cron tick)
            for c in args.concurrency.split(","):
                rows.append(("paused", uvloop.run(run_redis(
                    redis.url, min(args.requests, args.paused_rounds * int(c)), int(c),
                    redis.pid))))
        finally:
            pauser.done.set()
            pauser.join(5)
    finally:
        redis.stop()
        redis.cleanup()
    print(f"\n{'redis':>7} {'conc':>5} {'decisions':>9} {'policy':>6} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'max ms':>8} {'CPU us':>7} {'Redis CPU us':>12}")
    for mode, r in rows:
        print(f"{mode:>7} {r['concurrency']:>5} {r['decisions']:>9} {r['policy']:>6} "
              f"{r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['max_ms']:>8.3f} {r['cpu_us']:>7.1f} "
              f"{r['redis_cpu_us']:>12.1f}")

    local = [("private", local_cost(args.requests, ""))]
    try:
        from apirouter.shared_buckets import create_buckets_segment
        from apirouter.shm import unlink
    except ModuleNotFoundError as e:  # a tree from before the bucket segment: per-worker dicts
        if e.name != "apirouter.shared_buckets":  # not an unbuilt C core: that must fail
            raise
        create_buckets_segment = None  # type: ignore[assignment]
    if create_buckets_segment is not None:
        shm = create_buckets_segment(f"apirouter-bench-{os.getpid()}-buckets")
        try:
            local.append(("shared", local_cost(args.requests, shm.name)))
            ctx = multiprocessing.get_context("spawn")
            q = ctx.Queue()
            procs = [ctx.Process(target=_local_child, args=(args.requests, shm.name, q))
                     for _ in range(2)]
            for proc in procs:
                proc.start()
            costs = [q.get(timeout=300) for _ in procs]
            for proc in procs:
                proc.join(10)
            local.append(("shared x2", sum(costs) / len(costs)))
        finally:
            shm.close()
            unlink(shm.name)
    print(f"\n{'in-process':>10} {'CPU us per admission':>21}")
    for mode, cost in local:
        print(f"{mode:>10} {cost:>21.1f}")


if __name__ == "__main__":
    main()
