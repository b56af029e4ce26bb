"""How fast a change reaches every worker: config push to etcd, SIGHUP reload, admin override.

    python -m bench.propagation --trials 20 --workers 2

Starts a real etcd, two mock backends and a router on loopback. For each trial it makes a
change, then polls every worker (readyz over fresh connections, which reports each worker's
table generation) until all of them serve a generation published after the change. Reports
p50 / p95 / max of that delay per kind of change. Bounded: trials x a 5 s timeout each.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from tests.e2e.conftest import request
from tests.e2e.test_etcd_config import etcd_put, push
from tests.harness import EtcdServer, MockBackend, Router, http_get, router_config

TOKEN = "bench-admin"


def worker_generations(r: Router, workers: int) -> dict[int, int]:
    seen: dict[int, int] = {}
    for _ in range(200):
        body = json.loads(http_get(f"{r.url}/v1/status/readyz")[1])
        seen[body["worker_pid"]] = body["checks"]["routing_table"]["generation"]
        if len(seen) >= workers:
            break
    return seen


def wait_all_past(r: Router, workers: int, generation: int, timeout: float = 5.0) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        seen = worker_generations(r, workers)
        if len(seen) >= workers and min(seen.values()) > generation:
            return time.perf_counter() - started
    raise TimeoutError("workers did not converge")


def measure(kind: str, r: Router, workers: int, change: Callable[[int], None],
            trials: int) -> dict[str, Any]:
    delays = []
    for i in range(trials):
        before = max(worker_generations(r, workers).values())
        t0 = time.perf_counter()
        change(i)
        wait_all_past(r, workers, before)
        delays.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.05)
    delays.sort()
    return {"kind": kind, "trials": trials, "p50_ms": statistics.median(delays),
            "p95_ms": delays[int(len(delays) * 0.95) - 1 if len(delays) > 1 else 0],
            "max_ms": delays[-1]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.propagation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)

    import hashlib

    etcd = EtcdServer()
    mocks = [MockBackend("a"), MockBackend("b")]
    prefix = f"/apirouter-bench-{uuid.uuid4().hex[:6]}"
    sha = hashlib.sha256(TOKEN.encode()).hexdigest()
    base = router_config({"a": mocks[0].url, "b": mocks[1].url}, {"m": {"a": 1, "b": 1}},
                         admin_token_sha256=sha)
    push(etcd.endpoint, prefix, base)
    r_etcd = Router(None, etcd=etcd.endpoint, extra=["--etcd-prefix", prefix],
                    workers=args.workers)
    r_file = Router(base, workers=args.workers)
    results = []
    try:
        results.append(measure("etcd put (watch)", r_etcd, args.workers, lambda i: etcd_put(
            etcd.endpoint, f"{prefix}/models/m",
            json.dumps({"backends": [{"backend": "a", "weight": 1 + i % 5}, "b"]})),
            args.trials))
        results.append(measure("SIGHUP reload (file)", r_file, args.workers,
                               lambda i: os.kill(r_file.pid, signal.SIGHUP), args.trials))

        def override(i: int) -> None:
            status, _, _ = request(f"{r_etcd.url}/v1/admin/routing/overrides", "POST",
                                   json.dumps({"kind": "pin", "target": "m",
                                               "backend": "ab"[i % 2], "ttl_s": 60}).encode(),
                                   {"Authorization": f"Bearer {TOKEN}"})
            assert status == 201

        results.append(measure("admin override (etcd)", r_etcd, args.workers, override,
                               args.trials))
    finally:
        for proc in (r_etcd, r_file, *mocks, etcd):
            proc.stop()
            proc.cleanup()
    print(f"\nchange -> every one of {args.workers} workers serving it (ms, includes polling)")
    print(f"{'change':<24} {'p50':>8} {'p95':>8} {'max':>8}")
    for row in results:
        print(f"{row['kind']:<24} {row['p50_ms']:>8.1f} {row['p95_ms']:>8.1f} "
              f"{row['max_ms']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
