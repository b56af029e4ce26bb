"""Router overhead: the same load against the mock backend directly, through nginx and through
the router, in the same run.

    python -m bench.overhead                      # c=1 and c=32, 10 s each, 1 worker
    python -m bench.overhead --redis              # admission through a real redis-server
    python -m bench.overhead --duration 5 --connections 1,8,32 --workers 2

Reports, per concurrency and target (direct, nginx, router): requests/s, latency p50/p99, the
added latency (minus the direct run's, same run), CPU per request (the CPU time of the
target's processes divided by requests served: the mock for direct; nginx's master and worker;
every router process - supervisor, gunicorn master, workers) and throughput per core
(requests per CPU-second of those processes). nginx is Debian's, started here as a one-hop
keep-alive proxy to the same mock with one worker process. Then the ratios issue 14 judges by
- router CPU per request / nginx's, router throughput per core / nginx's - and a verdict
line per concurrency against the issue's targets (reported, never asserted). Load comes from
wrk (Debian package) on loopback only, bounded by --duration. Results are printed and written
as JSON under bench/results/.

    python -m bench.overhead --rounds 5 --duration 5   # each leg 5 times, interleaved

With ``--rounds N`` each concurrency runs its three legs N times, one after the other in turn
(direct, nginx, router, direct, ...), against the same processes; every figure is then the
median over the rounds (requests, errors and CPU seconds summed), and each round's ratios are
listed. On a shared 2-core machine one leg can be a few percent off: nginx's CPU per request
moved ±4% from run to run, which is more than most changes to the router's.

    python -m bench.overhead --rounds 5 --max-steal 2  # rounds on a busy host run again

Each leg reports its steal: the share of the machine's CPU time the hypervisor gave to
someone else while the leg ran. On a shared VM it came and went for minutes at a time (5-38%
of a leg here), and a leg that lost a tenth of its CPUs measured the host, not the code; a
line under the table calls out any leg above 2%. ``--max-steal PCT`` sets aside a round with
a leg above PCT and runs another, within twice the rounds asked for (then keeps what comes),
and lists what it set aside: the medians are then those of quiet rounds.

    python -m bench.overhead --floor                  # and the floor, in the same run

``--floor`` adds a fourth leg: bench.floor_proxy, a proxy on the router's own stack (uvloop,
picohttpparser, a keep-alive upstream pool parsed by httptools, the turn's writes together)
that does nothing else, in one process. Its CPU per request is what any Python router built
this way pays; the router's minus the floor's is what the rest costs (auth, admission,
routing, metrics, usage records, ..., and the supervisor's and gunicorn master's share).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from apirouter.keys import hash_key
from bench.procs import (
    FloorProxy,
    MockBackend,
    Nginx,
    RedisServer,
    Router,
    machine_steal,
    process_tree_cpu,
    steal_share,
)
from bench.report import interpreter
from bench.slo import Slo, Verdict, evaluate_one

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
TARGETS = ("direct", "nginx", "router")
FLOOR = "floor"  # the optional fourth leg (--floor): bench.floor_proxy
SETTLE_S = 0.25  # after a leg's load, before its CPU is read
NGINX_KEEPALIVE = 64  # idle upstream connections nginx keeps per worker


def _target(id_: str, what: str, metric: str, op: str, limit: float, unit: str) -> Slo:
    return Slo(f"issue14.{id_}", "project", what, metric, op, limit, unit, "issue 14")


# Issue 14's targets, by (concurrency, admission). Reported per run; never a test's assertion.
_WITHIN_3X = _target("throughput_per_core_vs_nginx", "router throughput per core / nginx's",
                     "throughput_per_core_ratio", ">=", 1 / 3, "ratio")
ISSUE_TARGETS: dict[tuple[int, str], tuple[Slo, ...]] = {
    (32, "in-process"): (_target("cpu_c32", "router CPU per request", "router_cpu_us_per_req",
                                 "<=", 60, "µs"), _WITHIN_3X),
    (32, "redis"): (_target("cpu_c32", "router CPU per request", "router_cpu_us_per_req",
                            "<=", 75, "µs"), _WITHIN_3X),
    (1, "in-process"): (_target("added_p50_c1", "added p50", "added_p50_ms", "<=", 0.15, "ms"),
                        _target("added_p99_c1", "added p99", "added_p99_ms", "<=", 1.0, "ms")),
    (1, "redis"): (_target("added_p50_c1", "added p50", "added_p50_ms", "<=", 0.30, "ms"),
                   _target("added_p99_c1", "added p99", "added_p99_ms", "<=", 1.0, "ms")),
}


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
    cpu_s: float | None = None  # CPU seconds of the target's processes during the run
    # requests / cpu_s: requests/s per core the target's processes kept busy
    rps_per_core: float | None = None
    # The share of the machine's CPU time its hypervisor took (steal) during the leg: a leg
    # with a few percent of it ran on a busy host, and its figures moved with the host.
    steal_pct: float | None = None


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    """requests, errors, rps, p50_ms and p99_ms from wrk's --latency report."""
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    errors += sum(int(x) for x in re.findall(r"Socket errors: connect (\d+), read (\d+), "
                                             r"write (\d+), timeout (\d+)", out)[0]) if (
        "Socket errors" in out) else 0
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return {"requests": requests, "errors": errors, "rps": rps,
            "p50_ms": _ms(lat["50"]), "p99_ms": _ms(lat["99"])}


def run_wrk(url: str, connections: int, duration: float, script: str) -> dict[str, Any]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
         "-s", script, url],
        capture_output=True, text=True, timeout=duration + 30, check=True).stdout
    return parse_wrk(out)


def bench_config(mock_url: str, redis_url: str = "") -> dict[str, Any]:
    """The router config every overhead measurement uses: one backend, one model, auth on
    with a hashed key whose limits never bind (admission still runs in full)."""
    return {"backends": {"bench": {"url": mock_url}},
            "models": {"bench-model": {"backends": ["bench"]}},
            "keys": {"bench": {"sha256": hash_key(BENCH_KEY), "org": "bench",
                               "tier": "admin", "rpm": 10**9, "tpm": 10**12}},
            "server": {"redis_url": redis_url}}


def wrk_script(body: str, extra: str = "") -> Any:
    """A wrk Lua script (a closed temporary file; unlink its .name) posting ``body`` with the
    bench key, followed by ``extra`` Lua."""
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    script.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
                 'wrk.headers["Content-Type"] = "application/json"\n'
                 f'wrk.headers["Authorization"] = "Bearer {BENCH_KEY}"\n{extra}')
    script.close()
    return script


def measure(url: str, target: str, connections: int, duration: float, script: str,
            cpu_pid: int | None) -> LoadResult:
    before = process_tree_cpu(cpu_pid) if cpu_pid else (0.0, 0.0)
    steal_before = machine_steal()
    r = run_wrk(url, connections, duration, script)
    share = steal_share(steal_before, machine_steal())
    cpu = own = cpu_s = per_core = None
    if cpu_pid and r["requests"]:
        # The work a leg leaves behind belongs to it: the supervisor drains the usage records
        # every 0.1 s (supervisor.usage_drain), after the load has stopped too.
        time.sleep(SETTLE_S)
        after = process_tree_cpu(cpu_pid)
        cpu_s = after[0] - before[0]
        cpu = cpu_s / r["requests"] * 1e6
        own = (after[1] - before[1]) / r["requests"] * 1e6
        per_core = r["requests"] / cpu_s if cpu_s > 0 else None
    return LoadResult(target, connections, r["requests"], r["errors"], r["rps"], r["p50_ms"],
                      r["p99_ms"], cpu, own if target == "router" else None, cpu_s, per_core,
                      None if share is None else share * 100)


def measure_legs(urls: dict[str, tuple[str, int]], connections: int, duration: float,
                 script: str) -> dict[str, LoadResult]:
    """One round: each target's leg in turn (url and the pid whose tree's CPU is counted)."""
    return {t: measure(url, t, connections, duration, script, pid)
            for t, (url, pid) in urls.items()}


def leg_steal(legs: dict[str, LoadResult]) -> float | None:
    """The most steal (%) any leg of a round had; None where the machine does not say."""
    return max((r.steal_pct for r in legs.values() if r.steal_pct is not None), default=None)


def quiet_rounds(run_round: Callable[[], dict[str, LoadResult]], wanted: int,
                 max_steal: float | None
                 ) -> tuple[list[dict[str, LoadResult]], list[float]]:
    """``wanted`` rounds of ``run_round()``. With ``max_steal``, a round one of whose legs
    lost more than that share of the CPUs to the hypervisor is set aside and run again,
    within 2 x ``wanted`` rounds in all; if the host stays busy the last ones are kept
    anyway (so a run always ends with ``wanted`` rounds). Returns the rounds kept and the
    steal of each round set aside."""
    kept: list[dict[str, LoadResult]] = []
    discarded: list[float] = []
    while len(kept) < wanted:
        legs = run_round()
        steal = leg_steal(legs)
        budget_left = 2 * wanted - len(kept) - len(discarded) > wanted - len(kept)
        if (max_steal is not None and steal is not None and steal > max_steal
                and budget_left):
            discarded.append(steal)
            continue
        kept.append(legs)
    return kept, discarded


def median_result(runs: list[LoadResult]) -> LoadResult:
    """One target's rounds as one result: the median of each rate, latency and cost per
    request; requests, errors and CPU seconds summed. A single round is itself."""
    if len(runs) == 1:
        return runs[0]

    def median(name: str) -> Any:
        values = [getattr(r, name) for r in runs]
        return None if None in values else statistics.median(values)

    cpu_s = [r.cpu_s for r in runs]
    first = runs[0]
    return LoadResult(first.target, first.connections, sum(r.requests for r in runs),
                      sum(r.errors for r in runs), median("rps"), median("p50_ms"),
                      median("p99_ms"), median("cpu_us_per_req"),
                      median("supervisor_cpu_us_per_req"),
                      None if None in cpu_s else sum(c for c in cpu_s if c is not None),
                      median("rps_per_core"), median("steal_pct"))


# What each round of a --rounds run lists (the row itself holds the medians).
ROUND_FIELDS = ("added_p50_ms", "added_p99_ms", "router_cpu_us_per_req",
                "nginx_cpu_us_per_req", "cpu_ratio", "throughput_per_core_ratio",
                "floor_cpu_us_per_req", "floor_cpu_ratio", "router_over_floor_cpu_us_per_req",
                "max_steal_pct")
# A leg whose steal is above this is called out under the table: its figures are the host's.
NOISY_STEAL_PCT = 2.0


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare(results: dict[str, LoadResult], admission: str) -> dict[str, Any]:
    """One concurrency's row: the three targets, the added latencies, the ratios against
    nginx, and the verdicts against issue 14's targets at this concurrency (if it has any);
    with a floor leg, the floor's CPU per request, its ratio to nginx's, and the router's
    CPU per request above it."""
    direct, nginx, router = (results[t] for t in TARGETS)
    row: dict[str, Any] = {
        "connections": direct.connections, "direct": asdict(direct), "nginx": asdict(nginx),
        "router": asdict(router),
        "added_p50_ms": router.p50_ms - direct.p50_ms,
        "added_p99_ms": router.p99_ms - direct.p99_ms,
        "nginx_added_p50_ms": nginx.p50_ms - direct.p50_ms,
        "nginx_added_p99_ms": nginx.p99_ms - direct.p99_ms,
        "router_cpu_us_per_req": router.cpu_us_per_req,
        "supervisor_cpu_us_per_req": router.supervisor_cpu_us_per_req,
        "nginx_cpu_us_per_req": nginx.cpu_us_per_req,
        "cpu_ratio": _ratio(router.cpu_us_per_req, nginx.cpu_us_per_req),
        "throughput_per_core_ratio": _ratio(router.rps_per_core, nginx.rps_per_core),
        "max_steal_pct": leg_steal(results),
    }
    floor = results.get(FLOOR)
    if floor is not None:
        row[FLOOR] = asdict(floor)
        row["floor_added_p50_ms"] = floor.p50_ms - direct.p50_ms
        row["floor_cpu_us_per_req"] = floor.cpu_us_per_req
        row["floor_cpu_ratio"] = _ratio(floor.cpu_us_per_req, nginx.cpu_us_per_req)
        row["router_over_floor_cpu_us_per_req"] = (
            router.cpu_us_per_req - floor.cpu_us_per_req
            if router.cpu_us_per_req is not None and floor.cpu_us_per_req is not None else None)
    verdicts = [evaluate_one(slo, row[slo.metric])
                for slo in ISSUE_TARGETS.get((direct.connections, admission), ())]
    row["verdicts"] = [v.as_dict() for v in verdicts]
    row["verdict_line"] = verdict_line(direct.connections, admission, verdicts)
    return row


def verdict_line(connections: int, admission: str, verdicts: list[Verdict]) -> str:
    head = f"c={connections} issue-14 verdict ({admission} admission):"
    if not verdicts:
        return f"{head} no target at this concurrency"
    parts = []
    for v in verdicts:
        word = {True: "ok", False: "MISS", None: "n/a"}[v.passed]
        measured = "n/a" if v.measured is None else f"{v.measured:.3g}"
        parts.append(f"{v.slo.what} {measured} {v.slo.unit} (target {v.slo.op} "
                     f"{v.slo.limit:.3g} {v.slo.unit}) {word}")
    overall = ("MET" if all(v.passed for v in verdicts) else
               "MISSED" if any(v.passed is False for v in verdicts) else "NOT MEASURED")
    return f"{head} {overall}: " + "; ".join(parts)


def legs(row: dict[str, Any]) -> tuple[str, ...]:
    """The targets a row measured: the three, and the floor when it ran."""
    return (*TARGETS, FLOOR) if FLOOR in row else TARGETS


def render(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'conns':>5} {'target':>7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
             f"{'added p50':>10} {'added p99':>10} {'CPU us/req':>10} {'of it sup.':>10} "
             f"{'req/CPU-s':>10} {'errors':>6} {'steal %':>7}"]
    for row in rows:
        direct = row["direct"]
        for t in legs(row):
            r = row[t]
            added = t != "direct"
            lines.append(
                f"{r['connections']:>5} {t:>7} {r['rps']:>9.0f} {r['p50_ms']:>8.3f} "
                f"{r['p99_ms']:>8.3f} "
                f"{(r['p50_ms'] - direct['p50_ms']) if added else 0:>10.3f} "
                f"{(r['p99_ms'] - direct['p99_ms']) if added else 0:>10.3f} "
                f"{r['cpu_us_per_req'] or 0:>10.1f} "
                f"{r['supervisor_cpu_us_per_req'] or 0:>10.1f} "
                f"{r['rps_per_core'] or 0:>10.0f} {r['errors']:>6} "
                f"{'n/a' if r.get('steal_pct') is None else format(r['steal_pct'], '.1f'):>7}")
    lines.append("")
    for row in rows:
        rounds = row.get("rounds")
        if rounds:
            lines.append(
                f"c={row['connections']} per round, router vs nginx: CPU per request "
                + " ".join(f"{r['cpu_ratio'] or 0:.2f}x" for r in rounds)
                + "; added p50 " + " ".join(f"{r['added_p50_ms']:.3f}" for r in rounds)
                + " ms; added p99 " + " ".join(f"{r['added_p99_ms']:.3f}" for r in rounds)
                + " ms; most steal of a leg " + " ".join(
                    "n/a" if r.get("max_steal_pct") is None else f"{r['max_steal_pct']:.1f}%"
                    for r in rounds))
    for row in rows:
        discarded = row.get("discarded_rounds")
        if discarded:
            lines.append(f"c={row['connections']}: {len(discarded)} round(s) set aside and run "
                         f"again, the host taking "
                         + ", ".join(f"{d:.1f}%" for d in discarded) + " of the CPUs in a leg")
    for row in rows:
        steal = max((r["max_steal_pct"] for r in [row, *row.get("rounds", ())]
                     if r.get("max_steal_pct") is not None), default=None)
        if steal is not None and steal > NOISY_STEAL_PCT:
            lines.append(
                f"c={row['connections']}: the host took up to {steal:.1f}% of the CPUs (steal) "
                f"during a leg: its figures moved with the host, not only with the code")
    for row in rows:
        cpu, tput = row["cpu_ratio"], row["throughput_per_core_ratio"]
        lines.append(
            f"c={row['connections']} router vs nginx: CPU per request "
            f"{row['router_cpu_us_per_req'] or 0:.1f} / {row['nginx_cpu_us_per_req'] or 0:.1f}"
            f" µs = {cpu or 0:.2f}x; throughput per core {row['router']['rps_per_core'] or 0:.0f}"
            f" / {row['nginx']['rps_per_core'] or 0:.0f} req/CPU-s = {tput or 0:.3f}")
        if FLOOR in row:
            lines.append(
                f"c={row['connections']} floor: CPU per request "
                f"{row['floor_cpu_us_per_req'] or 0:.1f} µs = {row['floor_cpu_ratio'] or 0:.2f}x "
                f"nginx's; the router's own work "
                f"{row['router_over_floor_cpu_us_per_req'] or 0:.1f} µs a request")
    lines += [row["verdict_line"] for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    p.add_argument("--connections", default="1,32", help="comma-separated concurrency levels")
    p.add_argument("--workers", type=int, default=1, help="router worker processes")
    p.add_argument("--endpoint", default="/v1/chat/completions",
                   choices=("/v1/chat/completions", "/v1/inference"))
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per target")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the three legs this many times, interleaved; report medians")
    p.add_argument("--redis", action="store_true",
                   help="admit through a real redis-server (default: the in-process limiter)")
    p.add_argument("--floor", action="store_true",
                   help="also measure bench.floor_proxy: the stack's floor, nothing else")
    p.add_argument("--max-steal", type=float, default=None, metavar="PCT",
                   help="run a round again when the host took more than PCT%% of the CPUs "
                        "(steal) during one of its legs (at most twice the rounds asked for "
                        "in all; the discarded rounds are reported)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench.overhead needs wrk: apt-get install -y wrk (tools/test.sh does)",
              file=sys.stderr)
        return 2
    levels = [int(c) for c in args.connections.split(",")]
    admission = "redis" if args.redis else "in-process"

    mock = MockBackend("bench", "--models", "bench-model")
    procs: list[Any] = [mock]
    body = BODY if args.endpoint == "/v1/chat/completions" else json.dumps(
        {k: v for k, v in json.loads(BODY).items() if k != "temperature"})
    script = wrk_script(body)
    rows: list[dict[str, Any]] = []
    try:
        # One nginx worker with a keep-alive upstream pool: the same-run comparison hop.
        nginx = Nginx(f"127.0.0.1:{mock.port}", workers=1, keepalive=NGINX_KEEPALIVE)
        procs.append(nginx)
        redis = RedisServer() if args.redis else None
        procs += [redis] if redis else []
        # Authentication on, as in production: every routed request carries an API key.
        router = Router(bench_config(mock.url, redis.url if redis else ""),
                        workers=args.workers)
        procs.append(router)
        floor = FloorProxy(f"127.0.0.1:{mock.port}") if args.floor else None
        procs += [floor] if floor else []
        urls = {"direct": (f"{mock.url}/v1/chat/completions", mock.pid),
                "nginx": (f"{nginx.url}/v1/chat/completions", nginx.pid),
                "router": (f"{router.url}{args.endpoint}", router.pid)}
        if floor is not None:
            # A plain hop, like nginx: the backend's own path whatever the router's endpoint.
            urls[FLOOR] = (f"{floor.url}/v1/chat/completions", floor.pid)
        for url, _ in urls.values():
            run_wrk(url, max(levels), args.warmup, script.name)
        for c in levels:
            rounds, discarded = quiet_rounds(
                partial(measure_legs, urls, c, args.duration, script.name),
                max(1, args.rounds), args.max_steal)
            row = compare({t: median_result([r[t] for r in rounds]) for t in urls},
                          admission)
            if args.max_steal is not None:
                row["discarded_rounds"] = discarded
            if len(rounds) > 1:
                row["rounds"] = [{k: v for k, v in compare(r, admission).items()
                                  if k in ROUND_FIELDS} for r in rounds]
            rows.append(row)
    finally:
        for proc in reversed(procs):
            proc.stop()
            proc.cleanup()
        os.unlink(script.name)

    python = interpreter()
    medians = f", medians of {args.rounds} rounds" if args.rounds > 1 else ""
    print(f"\nrouter overhead, {args.endpoint}, {args.workers} worker(s), {args.duration:g}s "
          f"per run{medians}, body {len(body)} bytes, {os.cpu_count()} cores, auth on, "
          f"admission {admission}; nginx 1 worker, keep-alive upstream; Python "
          f"{python['version']} at {python['executable']}")
    print(render(rows))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"overhead-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump({"endpoint": args.endpoint, "workers": args.workers, "admission": admission,
                   "duration_s": args.duration, "rounds": max(1, args.rounds),
                   "cores": os.cpu_count(),
                   "nginx": {"workers": 1, "upstream_keepalive": NGINX_KEEPALIVE},
                   "floor": args.floor,
                   "interpreter": python, "results": rows},
                  f, indent=2)
    print(f"\nwritten to {path}")
    failed = sum(row[t]["errors"] for row in rows for t in legs(row))
    if failed:
        print(f"{failed} requests failed during the benchmark", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
