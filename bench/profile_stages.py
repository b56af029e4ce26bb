"""Where a proxied request's router CPU goes, stage by stage.

    python -m bench.profile_stages                     # c=32, 10 s, in-process admission
    python -m bench.profile_stages --redis --duration 5 --connections 8

Runs the same setup as bench.overhead (one worker, auth on with a hashed key, usage accounting
to JSONL, a ~300-byte chat body against the mock backend), loads it with wrk, and samples the
worker and the supervisor with py-spy (non-blocking, so the sampled processes are not paused)
for the whole load. Each sample is put in one stage by its innermost frame that a rule in
STAGES recognises (see ``classify``); the stage's share of the worker's samples times the
worker's measured CPU per request gives microseconds per request per stage. The supervisor's
CPU per request (usage export, health, table) is reported beside it, so the rows add up to the
router CPU per request that bench.overhead reports.

Samples are of the interpreter's Python stacks: time in C (orjson, hashlib, the socket calls
uvloop makes) is charged to the Python frame that called it, which is the attribution we want
("the upstream write" includes its send()). Time the event loop spends between callbacks
(epoll, uvloop's own bookkeeping) shows as ``event loop``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import psutil

from bench.overhead import BODY, bench_config, run_wrk, wrk_script
from bench.procs import MockBackend, RedisServer, Router, process_tree_cpu

# (stage, path fragment, function names or None for any). The innermost frame matching a
# rule decides; order only matters between rules that match the same frame.
STAGES: tuple[tuple[str, str, frozenset[str] | None], ...] = (
    ("metrics", "prometheus_client/", None),
    ("metrics", "workers/metrics", None),
    ("usage record", "apirouter/usage", None),
    ("usage record", "workers/usage_out", None),
    ("audit/log", "logging/", None),
    ("admission", "workers/admission", None),
    ("admission", "apirouter/limits", None),
    ("admission", "apirouter/budgets", None),
    ("admission", "apirouter/redis_client", None),
    ("admission", "apirouter/shared_buckets", None),
    ("auth", "apirouter/keys", None),
    ("auth", "apirouter/signing", None),
    ("auth", "hashlib", None),
    ("routing", "apirouter/routing", None),
    ("routing", "apirouter/overrides", None),
    ("routing", "workers/forwarding", frozenset({"resolve_route", "candidates"})),
    ("upstream write/read", "workers/upstream", None),
    ("upstream write/read", "apirouter/sse", None),
    ("parse", "apirouter/validation", None),
    ("table", "workers/table_view", None),
    ("table", "apirouter/shm", None),
    ("table", "apirouter/stats", None),
    ("http parse", "workers/fast_server", frozenset({
        "data_received", "on_message_begin", "on_url", "on_header", "on_headers_complete",
        "on_body", "on_message_complete"})),
    ("response write", "workers/fast_server", None),
    ("response write", "workers/responses", None),
    ("accounting", "workers/accounting", None),
    # A loop turn's socket writes go out together (workers.turn_writes): the requests to the
    # backends and the responses to the clients, their send() system calls included.
    ("socket writes", "workers/turn_writes", None),
    # The serve loop's own frame: uvloop's epoll, socket reads and callback dispatch run in C
    # under it (not request glue).
    ("event loop", "workers/gunicorn_worker", frozenset({"run"})),
    ("pipeline", "workers/", None),
    ("event loop", "asyncio/", None),
    ("event loop", "uvloop/", None),
)
SUPERVISOR_STAGES: tuple[tuple[str, str, frozenset[str] | None], ...] = (
    ("usage export", "supervisor/usage", None),
    ("usage export", "supervisor/audit", None),
    ("usage export", "supervisor/record_store", None),
    ("usage export", "apirouter/usage_ring", None),
    ("usage export", "aiokafka/", None),
    ("health", "supervisor/health", None),
    ("table publish", "supervisor/publisher", None),
    ("table publish", "apirouter/table", None),
    ("metrics", "prometheus_client/", None),
    ("metrics", "supervisor/metrics", None),
    ("supervisor other", "supervisor/", None),
    ("event loop", "asyncio/", None),
    ("event loop", "uvloop/", None),
)


def _frame_parts(frame: str) -> tuple[str, str]:
    """py-spy's raw frame 'function (path/file.py:123)' -> (function, path)."""
    fn, _, rest = frame.partition(" (")
    return fn.strip(), rest.rsplit(":", 1)[0]


def classify(stack: str, rules: Iterable[tuple[str, str, frozenset[str] | None]] = STAGES
             ) -> str:
    """The stage of one sample: ``stack`` is py-spy raw format's frames, outermost first,
    separated by ';'."""
    rules = tuple(rules)
    for frame in reversed(stack.split(";")):
        fn, path = _frame_parts(frame)
        for stage, fragment, names in rules:
            # py-spy names methods by their qualified name (FastProtocol.on_body): the rules
            # name the function itself.
            if fragment in path and (names is None or fn.rpartition(".")[2] in names):
                return stage
    return "other"


def parse_raw(text: str, rules: Iterable[tuple[str, str, frozenset[str] | None]] = STAGES
              ) -> Counter[str]:
    """Samples per stage from py-spy's raw output ('stack count' per line)."""
    rules = tuple(rules)
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[classify(stack, rules)] += int(n)
    return counts


def hot_frames(text: str, n: int = 25) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """The ``n`` functions with the most samples: by self time (the innermost frame) and
    inclusive (anywhere on the stack, once per sample), as 'function (path)'. The stage table
    says which stage is heavy; these say which function in it to read."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [" (".join(_frame_parts(f)) + ")" for f in stack.split(";")]
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    return own.most_common(n), inclusive.most_common(n)


def breakdown(counts: Counter[str], cpu_us_per_req: float) -> list[tuple[str, float, float]]:
    """(stage, share of samples, µs per request), largest first."""
    total = sum(counts.values())
    if not total:
        return []
    return [(stage, n / total, n / total * cpu_us_per_req)
            for stage, n in counts.most_common()]


def _py_spy() -> str:
    found = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.access(found, os.X_OK):
        raise FileNotFoundError("py-spy is not installed (pip install -e '.[bench]')")
    return found


def _record(pid: int, duration: float, rate: int, out: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [_py_spy(), "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate),
         "--duration", str(max(1, round(duration))), "--nonblocking", "--output", out],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def profile(duration: float, connections: int, redis: bool, rate: int,
            warmup: float = 2.0) -> dict[str, object]:
    mock = MockBackend("bench", "--models", "bench-model")
    redis_server = RedisServer() if redis else None
    router = Router(bench_config(mock.url, redis_server.url if redis_server else ""), workers=1)
    script = wrk_script(BODY)
    tmp = tempfile.mkdtemp(prefix="apirouter-profile-")
    try:
        url = f"{router.url}/v1/chat/completions"
        run_wrk(url, connections, warmup, script.name)
        gunicorn = psutil.Process(router.state()["gunicorn_pid"])
        worker = gunicorn.children()[0].pid
        supervisor = router.pid
        spies = {name: _record(pid, duration, rate, os.path.join(tmp, f"{name}.txt"))
                 for name, pid in (("worker", worker), ("supervisor", supervisor))}
        time.sleep(0.3)  # py-spy attaches before the load starts
        before = {"worker": _cpu_s(worker), "supervisor": _cpu_s(supervisor),
                  "all": process_tree_cpu(router.pid)[0]}
        load = run_wrk(url, connections, duration, script.name)
        after = {"worker": _cpu_s(worker), "supervisor": _cpu_s(supervisor),
                 "all": process_tree_cpu(router.pid)[0]}
        for name, spy in spies.items():
            _, err = spy.communicate(timeout=duration + 30)
            if spy.returncode:
                raise RuntimeError(f"py-spy on the {name} failed: {err.decode()[-500:]}")
        n = load["requests"]
        per_req = {k: (after[k] - before[k]) / n * 1e6 for k in after}
        with open(os.path.join(tmp, "worker.txt")) as f:
            raw = f.read()
        worker_counts = parse_raw(raw)
        top_self, top_inclusive = hot_frames(raw)
        with open(os.path.join(tmp, "supervisor.txt")) as f:
            sup_counts = parse_raw(f.read(), SUPERVISOR_STAGES)
    finally:
        for proc in (router, mock, *([redis_server] if redis_server else [])):
            proc.stop()
            proc.cleanup()
        os.unlink(script.name)
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "connections": connections, "duration_s": duration, "admission":
        "redis" if redis else "in-process", "requests": n, "rps": load["rps"],
        "errors": load["errors"], "sample_rate_hz": rate,
        "cpu_us_per_req": per_req,
        "worker_samples": sum(worker_counts.values()),
        "worker": [{"stage": s, "share": sh, "us_per_req": us}
                   for s, sh, us in breakdown(worker_counts, per_req["worker"])],
        "supervisor": [{"stage": s, "share": sh, "us_per_req": us}
                       for s, sh, us in breakdown(sup_counts, per_req["supervisor"])],
        "worker_hot_self": [{"frame": f, "us_per_req": c / max(1, sum(worker_counts.values()))
                             * per_req["worker"]} for f, c in top_self],
        "worker_hot_inclusive": [{"frame": f, "us_per_req": c / max(
            1, sum(worker_counts.values())) * per_req["worker"]} for f, c in top_inclusive],
    }


def render(result: dict[str, object]) -> str:
    cpu = result["cpu_us_per_req"]
    assert isinstance(cpu, dict)
    rest = cpu["all"] - cpu["worker"] - cpu["supervisor"]  # gunicorn master, threads
    lines = [f"router CPU per request, c={result['connections']}, {result['duration_s']:g} s, "
             f"admission {result['admission']}: {cpu['all']:.1f} µs (worker {cpu['worker']:.1f}, "
             f"supervisor {cpu['supervisor']:.1f}, rest {rest:.1f}); {result['rps']:.0f} req/s, "
             f"{result['worker_samples']} worker samples",
             f"{'process':<11}{'stage':<24}{'share':>7}{'µs/req':>9}"]
    for proc in ("worker", "supervisor"):
        rows = result[proc]
        assert isinstance(rows, list)
        for row in rows:
            lines.append(f"{proc:<11}{row['stage']:<24}{row['share'] * 100:>6.1f}%"
                         f"{row['us_per_req']:>9.1f}")
    for key, title in (("worker_hot_self", "self"), ("worker_hot_inclusive", "inclusive")):
        rows = result.get(key) or []
        assert isinstance(rows, list)
        if rows:
            lines.append(f"\nworker functions by {title} time (µs/req):")
            lines.extend(f"{row['us_per_req']:>8.1f}  {row['frame']}" for row in rows)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_stages", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds of sampled load")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--redis", action="store_true", help="admit through a real redis-server")
    p.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench.profile_stages needs wrk: apt-get install -y wrk", file=sys.stderr)
        return 2
    result = profile(args.duration, args.connections, args.redis, args.rate)
    print(render(result))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"profile-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwritten to {path}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
