"""Router overhead: the same load against the mock backend directly and through the router.

    python -m bench.overhead                      # c=1 and c=32, 10 s each, 1 worker
    python -m bench.overhead --duration 5 --connections 1,8,32 --workers 2

Reports, per concurrency: requests/s and latency p50/p99 for direct and routed, the added
latency (routed minus direct, same run), and router CPU per request: the CPU time of every
router process (supervisor, gunicorn master, workers) divided by requests served. Load comes
from wrk (Debian package) on loopback only, bounded by --duration. Results are printed and
written as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from apirouter.keys import hash_key
from bench.procs import MockBackend, RedisServer, Router, process_tree_cpu

# A ~300-byte chat request, the size the design brief's measurements used.
BODY = json.dumps({
    "model": "bench-model",
    "messages": [
        {"role": "system", "content": "You are a terse assistant used for load testing."},
        {"role": "user", "content": "Summarise the benefits of keep-alive connections for a "
                                    "proxy in one sentence, please, and be brief about it."},
    ],
    "max_tokens": 16,
    "temperature": 0,
})
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
BENCH_KEY = "ar-bench-key"


@dataclass
class LoadResult:
    target: str
    connections: int
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_req: float | None = None
    # The part of it spent in the supervisor (usage export, health, control): the rest is
    # the gunicorn master and the workers.
    supervisor_cpu_us_per_req: float | None = None


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(url: str, connections: int, duration: float, script: str) -> dict[str, Any]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
         "-s", script, url],
        capture_output=True, text=True, timeout=duration + 30, check=True).stdout
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    errors += sum(int(x) for x in re.findall(r"Socket errors: connect (\d+), read (\d+), "
                                             r"write (\d+), timeout (\d+)", out)[0]) if (
        "Socket errors" in out) else 0
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return {"requests": requests, "errors": errors, "rps": rps,
            "p50_ms": _ms(lat["50"]), "p99_ms": _ms(lat["99"])}


def bench_config(mock_url: str, redis_url: str = "") -> dict[str, Any]:
    """The router config every overhead measurement uses: one backend, one model, auth on
    with a hashed key whose limits never bind (admission still runs in full)."""
    return {"backends": {"bench": {"url": mock_url}},
            "models": {"bench-model": {"backends": ["bench"]}},
            "keys": {"bench": {"sha256": hash_key(BENCH_KEY), "org": "bench",
                               "tier": "admin", "rpm": 10**9, "tpm": 10**12}},
            "server": {"redis_url": redis_url}}


def wrk_script(body: str) -> Any:
    """A wrk Lua script (a closed temporary file; unlink its .name) posting ``body`` with the
    bench key."""
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    script.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
                 'wrk.headers["Content-Type"] = "application/json"\n'
                 f'wrk.headers["Authorization"] = "Bearer {BENCH_KEY}"\n')
    script.close()
    return script


def measure(url: str, target: str, connections: int, duration: float, script: str,
            cpu_pid: int | None) -> LoadResult:
    before = process_tree_cpu(cpu_pid) if cpu_pid else (0.0, 0.0)
    r = run_wrk(url, connections, duration, script)
    cpu = own = None
    if cpu_pid and r["requests"]:
        after = process_tree_cpu(cpu_pid)
        cpu = (after[0] - before[0]) / r["requests"] * 1e6
        own = (after[1] - before[1]) / r["requests"] * 1e6
    return LoadResult(target, connections, r["requests"], r["errors"], r["rps"], r["p50_ms"],
                      r["p99_ms"], cpu, own)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    p.add_argument("--connections", default="1,32", help="comma-separated concurrency levels")
    p.add_argument("--workers", type=int, default=1, help="router worker processes")
    p.add_argument("--endpoint", default="/v1/chat/completions",
                   choices=("/v1/chat/completions", "/v1/inference"))
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per target")
    p.add_argument("--redis", action="store_true",
                   help="admit through a real redis-server (default: the in-process limiter)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench.overhead needs wrk: apt-get install -y wrk (tools/test.sh does)",
              file=sys.stderr)
        return 2
    levels = [int(c) for c in args.connections.split(",")]

    mock = MockBackend("bench", "--models", "bench-model")
    redis = RedisServer() if args.redis else None
    # Authentication on, as in production: every routed request carries an API key.
    router = Router(bench_config(mock.url, redis.url if redis else ""), workers=args.workers)
    body = BODY if args.endpoint == "/v1/chat/completions" else json.dumps(
        {k: v for k, v in json.loads(BODY).items() if k != "temperature"})
    script = wrk_script(body)
    results: list[LoadResult] = []
    try:
        direct_url = f"{mock.url}/v1/chat/completions"
        routed_url = f"{router.url}{args.endpoint}"
        for url in (direct_url, routed_url):
            run_wrk(url, max(levels), args.warmup, script.name)
        for c in levels:
            results.append(measure(direct_url, "direct", c, args.duration, script.name, mock.pid))
            results.append(measure(routed_url, "router", c, args.duration, script.name,
                                   router.pid))
    finally:
        for proc in (router, mock, *([redis] if redis else [])):
            proc.stop()
            proc.cleanup()
        os.unlink(script.name)

    rows = []
    print(f"\nrouter overhead, {args.endpoint}, {args.workers} worker(s), {args.duration:g}s "
          f"per run, body {len(body)} bytes, {os.cpu_count()} cores, auth on, admission "
          f"{'Redis' if redis else 'in-process'}")
    print(f"{'conns':>5} {'target':>7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'added p50':>10} {'added p99':>10} {'CPU us/req':>10} {'of it sup.':>10} "
          f"{'errors':>6}")
    for direct, routed in zip(results[::2], results[1::2], strict=True):
        for r in (direct, routed):
            added = r is routed
            print(f"{r.connections:>5} {r.target:>7} {r.rps:>9.0f} {r.p50_ms:>8.3f} "
                  f"{r.p99_ms:>8.3f} "
                  f"{(routed.p50_ms - direct.p50_ms) if added else 0:>10.3f} "
                  f"{(routed.p99_ms - direct.p99_ms) if added else 0:>10.3f} "
                  f"{r.cpu_us_per_req or 0:>10.1f} "
                  f"{(r.supervisor_cpu_us_per_req or 0) if added else 0:>10.1f} "
                  f"{r.errors:>6}")
        rows.append({"connections": direct.connections, "direct": asdict(direct),
                     "router": asdict(routed),
                     "added_p50_ms": routed.p50_ms - direct.p50_ms,
                     "added_p99_ms": routed.p99_ms - direct.p99_ms,
                     "router_cpu_us_per_req": routed.cpu_us_per_req,
                     "supervisor_cpu_us_per_req": routed.supervisor_cpu_us_per_req})
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"overhead-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump({"endpoint": args.endpoint, "workers": args.workers,
                   "duration_s": args.duration, "results": rows}, f, indent=2)
    print(f"\nwritten to {path}")
    failed = sum(r.errors for r in results)
    if failed:
        print(f"{failed} requests failed during the benchmark", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
