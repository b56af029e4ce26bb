"""Usage export: how fast the supervisor moves records out, and how soon a lookup finds one.

    python -m bench.usage_export --records 100000
    python -m bench.usage_export --audit 300      # plus audit availability through a router
    python -m bench.usage_export --records 0 --steps 60   # the embedded drain, step by step
    python -m bench.usage_export --records 0 --steps 60 --batch 930

Part 1 fills worker rings (64 slots) with encoded records, then times the supervisor's drainer
handing them to each sink: Kafka (a real tansu broker on loopback, acks=all, gzip, idempotence
off because tansu lacks it), the JSONL files of the embedded mode, and the disk spool followed
by its replay into Kafka. Reports records/s and supervisor CPU µs per record.

Part 2 (``--audit N``) runs a real router (2 workers, embedded mode and, with ``--redis``, the
Redis audit store) and, for N sequential requests, measures the time from the response to the
first successful GET /v1/audit/requests/{id} (polled every 5 ms): the issue's 2 s p99.
``--steps N`` times the embedded mode's drain one step at a time, N batches of 1,000 (or
``--batch``) fresh records (thread CPU, median µs per record): the scan of every ring's fill
(the supervisor's 128 slots), the ring peek, the index read, the JSONL append with its fsync,
the local audit store's write (run by the JSONL sink after its fsync, as the drain runs it).
Everything binds to 127.0.0.1; loops are bounded by the counts given.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from apirouter.shm import segment_name
from apirouter.usage import read_items, usage_record
from apirouter.usage_ring import (
    RingConsumer,
    RingFills,
    RingProducer,
    create_usage_segment,
    unlink_segment,
)
from supervisor.audit_writer import AuditWriter
from supervisor.main import STATS_SLOTS
from supervisor.usage_drain import Sink, UsageDrainer
from supervisor.usage_jsonl import JsonlSink
from supervisor.usage_kafka import KafkaSink
from tests.harness import HOST, KafkaBroker, MockBackend, RedisServer, Router

SLOTS = 64


def _records(n: int) -> list[bytes]:
    now = time.time()
    return [usage_record(kind="request", request_id=f"bench-{i:012d}", ts_start=now,
                         ts_end=now + 0.01, endpoint="/v1/chat/completions",
                         key_id=f"key-{i % 50}", org=f"org-{i % 7}", model="gpt-4o-mini",
                         backend_id="mock-a", decision_type="WEIGHTED", attempts=1, status=200,
                         error_code=None, prompt_tokens=12, completion_tokens=30,
                         cost_micro=4200, backend_s=0.008, table_generation=3, worker_pid=1)
            for i in range(n)]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _drain_into(sink: Sink, records: list[bytes], audit: AuditWriter | None = None
                      ) -> tuple[float, float]:
    shm = create_usage_segment(segment_name(str(os.getpid()), f"bench{time.monotonic_ns()}"),
                               SLOTS, 1 << 20)
    producers = [RingProducer(shm, i) for i in range(SLOTS)]
    for i, raw in enumerate(records):
        if not producers[i % SLOTS].put(raw):
            raise SystemExit("rings too small for --records; lower it")
    tmp = tempfile.mkdtemp(prefix="apirouter-bench-")
    drainer = UsageDrainer(shm, tmp, sink, audit)
    t0, c0 = time.perf_counter(), _cpu()
    await drainer.drain_all()
    elapsed, cpu = time.perf_counter() - t0, _cpu() - c0
    assert drainer.drained == len(records), (drainer.drained, len(records))
    drainer.close()
    for p in producers:
        p.release()
    shm.close()
    unlink_segment(shm)
    return elapsed, cpu


def _line(name: str, n: int, elapsed: float, cpu: float) -> None:
    print(f"{name:<34} {n / elapsed:>10,.0f} records/s   {cpu / n * 1e6:>6.1f} µs CPU/record")


async def export(n: int) -> None:
    records = _records(n)
    print(f"{n:,} records of ~{sum(map(len, records)) // n} bytes, drained from {SLOTS} rings")
    broker = KafkaBroker()
    tmp = tempfile.mkdtemp(prefix="apirouter-bench-")
    try:
        kafka = KafkaSink(broker.bootstrap, "bench-usage", os.path.join(tmp, "k1"),
                          idempotence=False, compression="gzip", timeout_s=10.0)
        await kafka.start()
        await _drain_into(kafka, _records(2000))  # warm: topic creation, connections
        _line("kafka (acks=all, gzip)", n, *await _drain_into(kafka, records))
        await kafka.close()

        jsonl = JsonlSink(os.path.join(tmp, "jsonl"))
        _line("jsonl files (fsync per batch)", n, *await _drain_into(jsonl, records))
        audit = AuditWriter(f"local:{os.path.join(tmp, 'audit')}", 3600)
        _line("jsonl + local audit store", n, *await _drain_into(jsonl, records, audit))
        await audit.close()

        broker.pause()  # Kafka unresponsive: batches time out into the spool
        spool = KafkaSink(broker.bootstrap, "bench-usage-2", os.path.join(tmp, "k2"),
                          idempotence=False, compression="gzip", timeout_s=1.0)
        await spool.start()
        _line("kafka down -> disk spool", n, *await _drain_into(spool, records))
        broker.resume()
        t0, c0 = time.perf_counter(), _cpu()
        deadline = time.monotonic() + 120
        while not spool.spool.empty() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        _line("spool replay -> kafka", n, time.perf_counter() - t0, _cpu() - c0)
        await spool.close()
    finally:
        broker.resume()
        broker.stop()
        broker.cleanup()


class _Timed:
    """A sink's ``then`` (the audit store's write) that keeps the thread CPU it took."""

    def __init__(self, job: Callable[..., None]) -> None:
        self.job = job
        self.ns = 0

    def __call__(self, *args: Any) -> None:
        t0 = time.thread_time_ns()
        self.job(*args)
        self.ns = time.thread_time_ns() - t0


def steps(batches: int, size: int = 1000) -> None:
    """The embedded drain's steps over ``batches`` batches of ``size`` fresh records, in a
    segment of the supervisor's STATS_SLOTS rings (records in the first)."""
    shm = create_usage_segment(segment_name(str(os.getpid()), f"steps{time.monotonic_ns()}"),
                               STATS_SLOTS, 1 << 20)
    prod, ring = RingProducer(shm, 0), RingConsumer(shm, 0)
    rings = [ring] + [RingConsumer(shm, i) for i in range(1, STATS_SLOTS)]
    fills = RingFills(shm, rings)
    tmp = tempfile.mkdtemp(prefix="apirouter-bench-")
    sink = JsonlSink(os.path.join(tmp, "spool"))
    audit = AuditWriter(f"local:{os.path.join(tmp, 'spool', 'audit')}", 3600)
    took: dict[str, list[float]] = {f"fill scan ({STATS_SLOTS} rings)": [], "peek": [],
                                    "read_items": [], "jsonl append + fsync": [],
                                    "audit write": []}
    tt = time.thread_time_ns
    try:
        for b in range(batches):
            for raw in _records(size):
                assert prod.put(raw.replace(b'"bench-', f'"b{b}-'.encode(), 1))
            t0 = tt()
            fills.levels()
            t1 = tt()
            raws, position = ring.peek()
            t2 = tt()
            items, _ = read_items(raws)
            t3 = tt()
            job = audit.local_put(items)
            assert job is not None
            timed = _Timed(job)
            sink._append(items, timed)  # as the drain runs it: the audit write after the fsync
            t4 = tt()
            assert job.done and job.error is None
            ring.commit(position)
            spent = (t1 - t0, t2 - t1, t3 - t2, t4 - t3 - timed.ns, timed.ns)
            for name, ns in zip(took, spent, strict=True):
                took[name].append(ns / size / 1000)
    finally:
        asyncio.run(audit.close())
        fills.release()
        for r in rings + [prod]:
            r.release()
        shm.close()
        unlink_segment(shm)
    print(f"embedded drain, {batches} batches of {size} records (median µs CPU/record):")
    for name, values in took.items():
        print(f"  {name:<22} {statistics.median(values):6.3f}")
    print(f"  {'total':<22} {sum(statistics.median(v) for v in took.values()):6.3f}")


def audit_latency(n: int, redis: bool) -> None:
    mock = MockBackend("a")
    server = RedisServer() if redis else None
    cfg = {"server": {"auth_required": False, **({"redis_url": server.url} if server else {})},
           "backends": {"a": {"url": mock.url}}, "models": {"m": {"backends": ["a"]}}}
    router = Router(cfg, workers=2)
    try:
        conn = http.client.HTTPConnection(HOST, router.port, timeout=10)
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        waits = []
        for _ in range(n):
            conn.request("POST", "/v1/chat/completions", body,
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            rid = resp.getheader("X-Request-ID")
            t0 = time.perf_counter()
            for _ in range(1000):  # 5 s at most
                conn.request("GET", f"/v1/audit/requests/{rid}")
                r = conn.getresponse()
                r.read()
                if r.status == 200:
                    break
                time.sleep(0.005)
            waits.append(time.perf_counter() - t0)
        waits.sort()
        store = "redis" if redis else "local sqlite"
        print(f"audit record available after the response ({store}, {n} requests): "
              f"p50 {statistics.median(waits) * 1000:.0f} ms, "
              f"p99 {waits[int(len(waits) * 0.99) - 1] * 1000:.0f} ms, "
              f"max {waits[-1] * 1000:.0f} ms")
    finally:
        for p in (router, mock, *([server] if server else [])):
            p.stop()
            p.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--audit", type=int, default=0, help="requests for the audit latency part")
    p.add_argument("--redis", action="store_true", help="audit store in a redis-server")
    p.add_argument("--steps", type=int, default=0, help="batches for the step-by-step part")
    p.add_argument("--batch", type=int, default=1000,
                   help="records a batch in the step-by-step part (the supervisor's drain "
                        "takes ~900 at 17,000 requests/s)")
    args = p.parse_args()
    if args.steps:
        steps(args.steps, args.batch)
    if args.records:
        asyncio.run(export(min(args.records, 120_000)))
    if args.audit:
        audit_latency(args.audit, args.redis)


if __name__ == "__main__":
    main()
