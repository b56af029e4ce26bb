"""Memory per worker over a long run: is it flat?

    python -m bench.memory_soak                       # 1,000,000 requests at c=32, ~3 minutes
    python -m bench.memory_soak --requests 200000 --redis

The router setup of bench.overhead (one worker, auth on with a hashed key, in-process or Redis
admission, usage accounting to JSONL, a ~300-byte chat body against the mock backend), loaded
by wrk with --connections connections for --requests requests, in segments of --interval
requests (default: 20 segments). A segment ends when its Lua script has counted its responses
(the load thread stops, then wrk is interrupted so it reports at once; responses wrk had
already read in the same pass count too, so a segment can run a few past its count, and the
samples say what wrk served); the whole soak is also
bounded by --max-seconds. After each segment the RSS of the worker, the supervisor and the
gunicorn master are sampled (with the worker's anonymous / shared-memory split from
/proc/PID/status: shared-memory pages touched for the first time count in RSS and are not a
leak).

Verdict: the worker's memory is flat when its RSS at the end exceeds its RSS after warm-up (the
first sample at >= 10% of the requests) by less than --bound-mib, AND the least-squares slope of
its RSS over the second half of the run, projected over the whole run, is also below
--bound-mib (a steady climb that has not yet added up is not flat). The p99 over the whole soak
is computed from wrk's merged latency histograms (1 µs buckets, after wrk's own correction for
coordinated omission, which adds samples for responses slower than twice the mean interval:
hence a few more samples than requests, as in wrk's own percentiles), with each segment's p99
beside it. Printed, and written as JSON (+ a PNG) under bench/results/. Exit status 1 when
memory is not flat, requests failed or the time bound cut the soak short; 2 without wrk.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from bench.overhead import BODY, bench_config, parse_wrk, wrk_script
from bench.procs import MockBackend, RedisServer, Router
from bench.stream_overhead import worker_pid

MIB = 2**20
WARM_FRACTION = 0.10  # the baseline: the first sample at or after this share of the requests
# Counts answered responses; at the segment's count the load thread stops and says so on
# stderr. done() prints wrk's latency histogram (value in µs, count) so segments merge exactly.
SEGMENT_LUA = """
local limit = %d
local answered = 0
function response(status, headers, body)
  answered = answered + 1
  if answered == limit then
    io.stderr:write("SEGMENT DONE\\n")
    io.stderr:flush()
    wrk.thread:stop()
  end
end
function done(summary, latency, requests)
  local parts = {}
  for i = 1, #latency do
    local value, count = latency(i)
    parts[#parts + 1] = string.format("%%d:%%d", value, count)
  end
  io.write("LATENCY_US ", table.concat(parts, " "), "\\n")
end
"""


def run_segment(url: str, connections: int, requests: int, max_s: float) -> dict[str, Any]:
    """One wrk run that ends after ``requests`` responses or ``max_s`` seconds, whichever
    comes first. wrk's main thread sleeps for -d whatever its load thread does, so once the
    script has stopped the load thread, wrk is sent SIGINT (its "stop now and report")."""
    script = wrk_script(BODY, SEGMENT_LUA % requests)
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, math.ceil(max_s))}s", "--latency",
           "-s", script.name, url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    said = b""
    try:
        assert proc.stderr is not None
        fd = proc.stderr.fileno()
        deadline = time.monotonic() + max_s + 5
        while b"SEGMENT DONE" not in said and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break  # wrk ended: the time bound came first
                said += chunk
        counted = b"SEGMENT DONE" in said
        if counted:
            # Only wrk's main thread left (sleeping): the signal cannot hit the load thread.
            stop_by = time.monotonic() + 5
            while len(os.listdir(f"/proc/{proc.pid}/task")) > 1 and time.monotonic() < stop_by:
                time.sleep(0.005)
            proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.unlink(script.name)
    out, err = stdout.decode(), (said + stderr).decode(errors="replace")
    if proc.returncode:
        raise RuntimeError(f"wrk exited with {proc.returncode}: {err[-500:]}")
    result = parse_wrk(out)
    hist: Counter[int] = Counter()
    for line in out.splitlines():
        if line.startswith("LATENCY_US"):
            for pair in line.split()[1:]:
                value, count = pair.split(":")
                hist[int(value)] += int(count)
    result.update(histogram=hist, counted=counted)
    return result


def percentile_ms(hist: Counter[int], pct: float) -> float | None:
    """The smallest latency with at least ``pct`` % of the samples at or below it."""
    total = sum(hist.values())
    if not total:
        return None
    rank = math.ceil(total * pct / 100)
    seen = 0
    for value in sorted(hist):
        seen += hist[value]
        if seen >= rank:
            return value / 1000
    return max(hist) / 1000


def _status_kib(pid: int) -> dict[str, int]:
    """RssAnon / RssFile / RssShmem of /proc/PID/status, in KiB (empty where absent)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f)
                    if k in ("RssAnon", "RssFile", "RssShmem")}
    except OSError:
        return {}


def sample_memory(pids: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, pid in pids.items():
        out[f"{name}_rss_mib"] = psutil.Process(pid).memory_info().rss / MIB
    split = _status_kib(pids["worker"])
    for key, field in (("RssAnon", "anon"), ("RssShmem", "shmem"), ("RssFile", "file")):
        out[f"worker_{field}_mib"] = split[key] / 1024 if key in split else None
    return out


def flatness(points: list[tuple[int, float]], bound_mib: float) -> dict[str, Any]:
    """Is a series of (requests so far, RSS MiB) flat? Pure: see the module docstring."""
    total = points[-1][0]
    warm = next((p for p in points if p[0] > 0 and p[0] >= WARM_FRACTION * total), points[-1])
    growth = points[-1][1] - warm[1]
    half = [p for p in points if p[0] >= total / 2]
    slope = None
    if len(half) >= 2:
        mx = sum(x for x, _ in half) / len(half)
        my = sum(y for _, y in half) / len(half)
        sxx = sum((x - mx) ** 2 for x, _ in half)
        slope = sum((x - mx) * (y - my) for x, y in half) / sxx * 1e6 if sxx else None
    projected = slope * total / 1e6 if slope is not None else None
    flat = growth < bound_mib and (projected is None or projected < bound_mib)
    return {"warm_requests": warm[0], "warm_mib": warm[1], "end_mib": points[-1][1],
            "growth_mib": growth, "second_half_slope_mib_per_million": slope,
            "second_half_projected_mib": projected,
            # Higher at every sample of the second half: how a leak looks, whatever its size.
            "second_half_rising": len(half) >= 2 and all(
                b[1] > a[1] for a, b in zip(half, half[1:], strict=False)),
            "bound_mib": bound_mib, "flat": flat}


def soak(requests: int, interval: int, connections: int, redis: bool, max_s: float,
         bound_mib: float) -> dict[str, Any]:
    mock = MockBackend("bench", "--models", "bench-model")
    procs: list[Any] = [mock]
    samples: list[dict[str, Any]] = []
    hist: Counter[int] = Counter()
    errors = 0
    t0 = time.monotonic()
    try:
        redis_server = RedisServer() if redis else None
        procs += [redis_server] if redis_server else []
        router = Router(bench_config(mock.url, redis_server.url if redis_server else ""),
                        workers=1)
        procs.append(router)
        pids = {"worker": worker_pid(router), "supervisor": router.pid,
                "gunicorn": router.state()["gunicorn_pid"]}
        url = f"{router.url}/v1/chat/completions"
        samples.append({"requests": 0, "elapsed_s": 0.0, **sample_memory(pids)})
        done = 0
        while done < requests and (left := max_s - (time.monotonic() - t0)) > 1:
            seg = run_segment(url, connections, min(interval, requests - done), left)
            done += seg["requests"]
            errors += seg["errors"]
            hist.update(seg["histogram"])
            if worker_pid(router) != pids["worker"]:
                raise RuntimeError("the worker was replaced during the soak: its memory "
                                   "curve would mix two processes")
            samples.append({"requests": done, "elapsed_s": time.monotonic() - t0,
                            "rps": seg["rps"], "p99_ms": seg["p99_ms"],
                            "errors": seg["errors"], **sample_memory(pids)})
            if not seg["counted"]:
                break  # the time bound ended the segment
    finally:
        for proc in reversed(procs):
            proc.stop()
            proc.cleanup()
    wall = time.monotonic() - t0
    done = samples[-1]["requests"]
    return {
        "requests_asked": requests, "requests": done, "interval": interval,
        "connections": connections, "admission": "redis" if redis else "in-process",
        "errors": errors, "wall_s": wall, "completed": done >= requests,
        "max_seconds": max_s, "cores": os.cpu_count(),
        "p50_ms": percentile_ms(hist, 50), "p99_ms": percentile_ms(hist, 99),
        "latency_samples": sum(hist.values()),
        "worker": flatness([(s["requests"], s["worker_rss_mib"]) for s in samples], bound_mib),
        "supervisor": flatness([(s["requests"], s["supervisor_rss_mib"]) for s in samples],
                               bound_mib),
        "samples": samples,
    }


def verdict_line(name: str, f: dict[str, Any]) -> str:
    slope = f["second_half_slope_mib_per_million"]
    return (f"{name} memory {'FLAT' if f['flat'] else 'NOT FLAT'}: RSS {f['warm_mib']:.1f} MiB "
            f"after warm-up ({f['warm_requests']:,} requests) -> {f['end_mib']:.1f} MiB at the "
            f"end ({f['growth_mib']:+.2f} MiB, bound < {f['bound_mib']:g} MiB); second-half "
            f"slope {'n/a' if slope is None else f'{slope:+.2f} MiB per 1M requests'}"
            f"{', rising at every sample' if f['second_half_rising'] else ''}")


def render(result: dict[str, Any]) -> str:
    lines = [f"memory soak: {result['requests']:,} of {result['requests_asked']:,} requests at "
             f"c={result['connections']}, 1 worker, auth on, {result['admission']} admission, "
             f"{result['wall_s']:.0f} s, {result['errors']} errors",
             f"{'requests':>10} {'worker MiB':>10} {'anon':>7} {'shmem':>7} "
             f"{'supervisor':>10} {'gunicorn':>9} {'req/s':>7} {'p99 ms':>7}"]
    for s in result["samples"]:
        lines.append(f"{s['requests']:>10,} {s['worker_rss_mib']:>10.1f} "
                     f"{s['worker_anon_mib'] or 0:>7.1f} {s['worker_shmem_mib'] or 0:>7.1f} "
                     f"{s['supervisor_rss_mib']:>10.1f} {s['gunicorn_rss_mib']:>9.1f} "
                     f"{s.get('rps', 0):>7.0f} {s.get('p99_ms', 0):>7.2f}")
    p50, p99 = result["p50_ms"], result["p99_ms"]
    lines += ["", f"latency over the soak at c={result['connections']}: p50 "
              f"{p50 or 0:.3f} ms, p99 {p99 or 0:.3f} ms ({result['latency_samples']:,} samples)",
              verdict_line("worker", result["worker"]),
              verdict_line("supervisor", result["supervisor"])]
    if not result["completed"]:
        lines.append(f"INCOMPLETE: the {result['max_seconds']:g} s bound ended the soak")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    from bench.plots import COLORS, plt

    s = result["samples"]
    x = [p["requests"] / 1000 for p in s]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    a1.plot(x, [p["worker_rss_mib"] for p in s], "o-", color=COLORS["router"], label="worker")
    a1.plot(x, [p["supervisor_rss_mib"] for p in s], "s--", color=COLORS["direct"],
            label="supervisor")
    a1.axvline(result["worker"]["warm_requests"] / 1000, color="#888888", linestyle=":")
    a1.set_ylabel("RSS, MiB")
    a1.legend(fontsize=8)
    a1.grid(True, alpha=0.3)
    a2.plot(x[1:], [p["p99_ms"] for p in s[1:]], "o-", color=COLORS["router"])
    a2.set_ylabel(f"segment p99, ms (c={result['connections']})")
    a2.set_xlabel("requests, thousands")
    a2.grid(True, alpha=0.3)
    fig.suptitle(f"memory soak, {result['admission']} admission: worker "
                 f"{'flat' if result['worker']['flat'] else 'NOT flat'}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory_soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=1_000_000, help="requests in the soak")
    p.add_argument("--interval", type=int, help="requests between samples (default 1/20)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--redis", action="store_true", help="admit through a real redis-server")
    p.add_argument("--max-seconds", type=float, default=900.0, help="time bound of the soak")
    p.add_argument("--bound-mib", type=float, default=5.0, help="flat: growth below this")
    p.add_argument("--no-plot", action="store_true", help="JSON only")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench.memory_soak needs wrk: apt-get install -y wrk", file=sys.stderr)
        return 2
    if args.requests < 1 or args.connections < 1 or (args.interval or 1) < 1:
        print("bench.memory_soak: --requests, --interval, --connections must be positive",
              file=sys.stderr)
        return 2
    interval = args.interval or max(1, args.requests // 20)
    result = soak(args.requests, interval, args.connections, args.redis, args.max_seconds,
                  args.bound_mib)
    print(render(result))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"memory-soak-{time.strftime('%Y%m%d-%H%M%S')}")
    if not args.no_plot:
        plot(result, stem + ".png")
        result["plot"] = os.path.basename(stem + ".png")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwritten to {stem}.json")
    return 0 if result["worker"]["flat"] and not result["errors"] and result["completed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
