"""What streaming through the router costs, against calling the mock backend directly.

    python -m bench.stream_overhead                 # defaults below, ~1 minute
    python -m bench.stream_overhead --streams 20 --events 1000
    python -m bench.stream_overhead --profile      # + where the worker's CPU per event goes

Same run, same mock, 1 worker, auth on (a key whose limits never bind), in-process admission,
JSONL usage:

- router CPU per streamed event: ``--concurrency`` clients read ``--streams`` streams of
  ``--events`` events each, as fast as the mock writes them; the CPU of every router process
  divided by the events relayed (the per-request part is amortised over the stream);
- added latency per event and added time to first token: streams paced at ``--interval-ms``;
  for event i, the arrival time through the router minus the arrival time direct (both from
  sending the request), averaged over events i >= 1 (per event) and for i = 0 (TTFT);
- memory: the worker's RSS sampled while one 1,000-event stream passes through (flat = the
  relay holds no more than an event or a socket buffer);
- disconnect: a client reads 3 events of a paced stream and closes its socket; the time until
  the mock reports that stream aborted by its peer (an upper bound: the mock is polled).

With ``--profile``, the worker is sampled with py-spy (non-blocking) during the CPU
measurement, and the top innermost frames and source lines are reported with their share of
the samples and the µs per event that share is of the worker's own CPU per event.

Printed, and written as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from bench.overhead import BENCH_KEY, bench_config
from bench.procs import HOST, MockBackend, Router, process_tree_cpu
from bench.profile_stages import _py_spy, hot_frames


def stream_once(port: int, body: bytes, auth: bool, close_after: int | None = None
                ) -> tuple[list[float], int]:
    """POST a streaming request; (arrival times of each data event from sending, events)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = f"Bearer {BENCH_KEY}"
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, headers)
    resp = conn.getresponse()
    assert resp.status == 200, resp.status
    times: list[float] = []
    while True:
        line = resp.fp.readline()  # chunked framing is decoded by http.client's reader
        if not line:
            break
        if line.startswith(b"data: "):
            times.append(time.perf_counter() - t0)
            if line.startswith(b"data: [DONE]"):
                break
            if close_after is not None and len(times) >= close_after:
                conn.sock.close()
                return times, len(times)
    conn.close()
    return times, len(times)


def _body(events: int, interval_ms: float) -> bytes:
    return json.dumps({"model": "bench-model", "stream": True,
                       "messages": [{"role": "user", "content": "stream please"}],
                       "mock": {"reply_tokens": events, "event_interval_ms": interval_ms}}
                      ).encode()


def cpu_per_event(router: Router, streams: int, events: int, concurrency: int,
                  profile_rate: int = 0) -> dict[str, Any]:
    body = _body(events, 0)
    stream_once(router.port, body, True)  # warm the pool and the worker
    worker = worker_pid(router)
    spy = None
    if profile_rate:
        tmp = tempfile.mkdtemp(prefix="apirouter-stream-profile-")
        raw = os.path.join(tmp, "worker.txt")
        spy = subprocess.Popen(
            [_py_spy(), "record", "--pid", str(worker), "--format", "raw", "--rate",
             str(profile_rate), "--nonblocking", "--output", raw],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # py-spy attaches before the load starts
    worker_before = process_tree_cpu(worker)[1]
    done: list[int] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        for _ in range(n):
            _, got = stream_once(router.port, body, True)
            with lock:
                done.append(got)

    per = [streams // concurrency + (1 if i < streams % concurrency else 0)
           for i in range(concurrency)]
    before = process_tree_cpu(router.pid)[0]
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in per]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    cpu = process_tree_cpu(router.pid)[0] - before
    worker_cpu = process_tree_cpu(worker)[1] - worker_before
    relayed = sum(done)
    result: dict[str, Any] = {
        "streams": len(done), "events": relayed, "events_per_s": relayed / wall,
        "router_cpu_us_per_event": cpu / relayed * 1e6,
        "worker_cpu_us_per_event": worker_cpu / relayed * 1e6,
        "router_cpu_us_per_stream": cpu / len(done) * 1e6}
    if spy is not None:
        spy.send_signal(2)  # SIGINT: py-spy writes what it sampled and exits
        _, err = spy.communicate(timeout=60)
        try:
            with open(raw) as f:
                text = f.read()
        except OSError:
            raise RuntimeError(f"py-spy failed: {err.decode()[-500:]}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        result["profile"] = top_frames(text, result["worker_cpu_us_per_event"])
    return result


def top_frames(raw: str, us_per_event: float, n: int = 15) -> dict[str, Any]:
    """From py-spy's raw output: the top innermost functions (bench.profile_stages.hot_frames)
    and source lines, with their share of the samples and that share of the worker's µs per
    event."""
    lines: Counter[str] = Counter()
    for stack, _, count in (row.rpartition(" ") for row in raw.splitlines()):
        if stack and count.isdigit():
            lines[stack.rsplit(";", 1)[-1].strip()] += int(count)  # 'function (path:line)'
    total = sum(lines.values()) or 1
    return {"samples": total,
            **{name: [{"frame": k, "share": round(v / total, 4),
                       "us_per_event": round(v / total * us_per_event, 3)} for k, v in top]
               for name, top in (("functions", hot_frames(raw, n)[0]),
                                 ("lines", lines.most_common(n)))}}


def latency(router: Router, mock: MockBackend, rounds: int, events: int, interval_ms: float
            ) -> dict[str, float]:
    body = _body(events, interval_ms)
    added_first, added_rest = [], []
    for _ in range(rounds):
        direct, _ = stream_once(mock.port, body, False)
        routed, _ = stream_once(router.port, body, True)
        n = min(len(direct), len(routed))
        added_first.append(routed[0] - direct[0])
        added_rest.append(statistics.mean(routed[i] - direct[i] for i in range(1, n)))
    return {"added_ttft_ms_median": statistics.median(added_first) * 1000,
            "added_latency_per_event_ms_median": statistics.median(added_rest) * 1000,
            "added_latency_per_event_ms_max": max(added_rest) * 1000}


def worker_pid(router: Router) -> int:
    workers = psutil.Process(router.state()["gunicorn_pid"]).children()
    return int(workers[0].pid)


def memory(router: Router, events: int, interval_ms: float) -> dict[str, Any]:
    proc = psutil.Process(worker_pid(router))
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(proc.memory_info().rss)
            time.sleep(0.05)

    stream_once(router.port, _body(50, 0), True)  # warm
    t = threading.Thread(target=sample)
    t.start()
    _, got = stream_once(router.port, _body(events, interval_ms), True)
    stop.set()
    t.join()
    third = max(1, len(samples) // 3)
    return {"events": got, "rss_samples": len(samples),
            "rss_first_third_mib": max(samples[:third]) / 2**20,
            "rss_last_third_mib": max(samples[-third:]) / 2**20,
            "rss_growth_kib": (max(samples[-third:]) - max(samples[:third])) / 1024}


def disconnect(router: Router, mock: MockBackend, trials: int) -> dict[str, float]:
    body = _body(500, 20)
    took = []
    for _ in range(trials):
        aborted = mock.stats()["streams_aborted"]
        stream_once(router.port, body, True, close_after=3)
        t0 = time.perf_counter()
        while mock.stats()["streams_aborted"] == aborted:
            if time.perf_counter() - t0 > 5:
                raise RuntimeError("the backend stream was not cancelled within 5 s")
            time.sleep(0.002)
        took.append(time.perf_counter() - t0)
    return {"cancel_ms_median": statistics.median(took) * 1000,
            "cancel_ms_max": max(took) * 1000}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stream_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=40, help="streams for the CPU measurement")
    p.add_argument("--events", type=int, default=500, help="events per stream (CPU)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rounds", type=int, default=10, help="paced stream pairs (latency)")
    p.add_argument("--interval-ms", type=float, default=5.0, help="pacing between events")
    p.add_argument("--memory-events", type=int, default=1000)
    p.add_argument("--profile", nargs="?", type=int, const=1000, default=0, metavar="HZ",
                   help="sample the worker with py-spy during the CPU measurement")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    mock = MockBackend("bench", "--models", "bench-model")
    router = Router(bench_config(mock.url), workers=1)
    try:
        result = {
            "cpu": cpu_per_event(router, args.streams, args.events, args.concurrency,
                                 args.profile),
            "latency": latency(router, mock, args.rounds, 50, args.interval_ms),
            "memory": memory(router, args.memory_events, 2.0),
            "disconnect": disconnect(router, mock, 10),
            "cores": os.cpu_count(),
        }
    finally:
        for proc in (router, mock):
            proc.stop()
            proc.cleanup()
    print(json.dumps(result, indent=2))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"stream-overhead-{int(time.time())}.json"), "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
