"""User-space instructions per proxied request of one worker, counted by valgrind.

    python -m bench.instructions                  # c=32, runs of 3 s and 9 s
    python -m bench.instructions --seconds 2 --out bench/results

CPU time on a shared 2-core VM moves by ±5% from one run to the next, and more between hours
(bench.overhead's ratios to nginx cancel some of it, not all). A count of instructions does
not move: this runs the worker's request path in one process — the lean server, the pipeline,
the upstream pools, admission on a bucket segment, the usage ring and the stats segment, the
multiprocess metrics — under ``valgrind --tool=cachegrind`` (its instruction count only), loads
it with wrk (c=32, the bench.overhead body and key) against the mock backend (not counted),
and differences two runs of different lengths, so start-up cancels: instructions per request =
(I refs of the long run - of the short one) / (requests of the long run - of the short one).
Repeated runs agree within ~0.2%, so a change of 1% shows, where bench.overhead needs many
alternating runs to see 5%. It counts what the worker's code costs, not what the kernel does
for it (the socket calls are ~a quarter of its CPU: bench.profile_stages) and not cache
misses; bench.overhead's same-run ratios to nginx stay the measure the targets are judged by.

Requests are parsed by httptools here: valgrind 3.19 cannot run the SSE4.2 string instruction
(pcmpestri) the fast path's picohttpparser uses, so FastProtocol.whole_requests is off.
Needs valgrind (apt install valgrind) and wrk.
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
from pathlib import Path
from typing import Any

from bench.overhead import BODY, bench_config, run_wrk, wrk_script
from bench.procs import HOST, MockBackend, free_port

ROOT = Path(__file__).resolve().parent.parent
_IREFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def serve(mock_url: str, port: int, stop_file: str) -> None:
    """The in-process worker (run under valgrind): serve until ``stop_file`` appears, then
    print how many requests were answered."""
    run_dir = tempfile.mkdtemp(prefix="apirouter-instructions-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = run_dir  # before any metric is made, as a worker
    import asyncio
    import gc

    import uvloop

    from apirouter.config import parse_config
    from apirouter.shared_buckets import BUCKETS_SEGMENT_ENV, create_buckets_segment
    from apirouter.shm import TableReader, TableWriter, segment_name, unlink
    from apirouter.stats import WorkerStats, create_stats_segment
    from apirouter.table import compile_table, encode_table
    from apirouter.usage_ring import create_usage_segment
    from workers.fast_server import FastProtocol, FastServer
    from workers.pipeline import Pipeline
    from workers.table_view import TableCache
    from workers.usage_out import UsageOut

    FastProtocol.whole_requests = False  # see the module's docstring
    names = [segment_name(str(os.getpid()), kind)
             for kind in ("table", "stats", "usage", "buckets")]
    os.environ[BUCKETS_SEGMENT_ENV] = names[3]

    async def main() -> int:
        table = TableWriter(names[0], 1 << 20)
        table.publish(encode_table(compile_table(parse_config(bench_config(mock_url)),
                                                 source="bench.instructions")))
        create_stats_segment(names[1], 4, 4)
        create_usage_segment(names[2], 4, 32 << 20)
        create_buckets_segment(names[3])
        tables = TableCache(TableReader(table.name))
        stats = WorkerStats(names[1], run_dir)
        pipeline = Pipeline(tables, stats, UsageOut(names[2], stats.slot, run_dir))

        def no_handoff() -> asyncio.Protocol:
            raise RuntimeError("bench.instructions serves the hot endpoints only")

        fast = FastServer(pipeline, no_handoff, keepalive_s=30)
        server = await asyncio.get_running_loop().create_server(fast.protocol, HOST, port,
                                                                backlog=128)
        gc.collect()  # as the worker does before it serves (workers.app)
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        print("READY", flush=True)
        while not os.path.exists(stop_file):
            await asyncio.sleep(0.2)
        server.close()
        pipeline.accounts.flush()
        return int(next(pipeline.ids._counter)) - 1  # wrk sends no X-Request-ID: one id each

    try:
        served = uvloop.run(main())
    finally:  # (unlinked, not closed: the worker's objects still map them; it exits next)
        for name in names:
            unlink(name)
        shutil.rmtree(run_dir, ignore_errors=True)
    print("SERVED", served, flush=True)


def count(mock_url: str, seconds: float, connections: int, script: str) -> tuple[int, int]:
    """(instructions, requests) of one run of the in-process worker under valgrind."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="apirouter-instructions-") as tmp:
        stop = os.path.join(tmp, "stop")
        # valgrind's report to a file: a pipe nobody reads while wrk runs could fill and stall
        with open(os.path.join(tmp, "valgrind.txt"), "w+") as report:
            proc = subprocess.Popen(
                ["valgrind", "--tool=cachegrind", "--cache-sim=no",
                 "--cachegrind-out-file=/dev/null", sys.executable, "-m", "bench.instructions",
                 "--serve", mock_url, str(port), stop],
                cwd=str(ROOT), stdout=subprocess.PIPE, stderr=report, text=True)
            try:
                assert proc.stdout is not None
                line = proc.stdout.readline()  # valgrind's start-up takes ~10 s
                if line.strip() != "READY":
                    raise RuntimeError(f"the worker under valgrind did not start: {line!r}")
                load = run_wrk(f"http://{HOST}:{port}/v1/chat/completions", connections,
                               seconds, script)
                if load["errors"]:
                    raise RuntimeError(f"{load['errors']} requests failed: the count would "
                                       "not be of the request path")
            finally:
                Path(stop).touch()  # the worker unlinks its segments as it stops
                try:
                    out, _ = proc.communicate(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, _ = proc.communicate()
            report.seek(0)
            err = report.read()
    served = re.search(r"SERVED (\d+)", out)
    irefs = _IREFS.search(err)
    if served is None or irefs is None:
        raise RuntimeError(f"no count from valgrind (exit {proc.returncode}): {err[-500:]}")
    return int(irefs[1].replace(",", "")), int(served[1])


def measure(seconds: float, connections: int) -> dict[str, Any]:
    mock = MockBackend("bench", "--models", "bench-model")
    script = wrk_script(BODY)
    try:
        short = count(mock.url, seconds, connections, script.name)
        long = count(mock.url, seconds * 3, connections, script.name)
    finally:
        os.unlink(script.name)
        mock.stop()
        mock.cleanup()
    if long[1] <= short[1]:
        raise RuntimeError(f"the long run served no more requests than the short one: "
                           f"{short} {long}")
    return {"connections": connections, "seconds": [seconds, seconds * 3],
            "runs": [{"instructions": i, "requests": n} for i, n in (short, long)],
            "instructions_per_request": (long[0] - short[0]) / (long[1] - short[1])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0,
                   help="length of the short run; the long one is three times that")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--out", help="directory for a JSON result (instructions-<time>.json)")
    p.add_argument("--serve", nargs=3, metavar=("MOCK_URL", "PORT", "STOP_FILE"),
                   help=argparse.SUPPRESS)  # the worker's side, run under valgrind
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), args.serve[2])
        return 0
    for tool in ("valgrind", "wrk"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (apt install {tool})", file=sys.stderr)
            return 2
    result = measure(args.seconds, args.connections)
    runs = ", ".join(f"{r['requests']} requests {r['instructions'] / 1e6:.0f}M"
                     for r in result["runs"])
    print(f"c={args.connections}: {result['instructions_per_request']:,.0f} instructions per "
          f"request ({runs})")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, time.strftime("instructions-%Y%m%d-%H%M%S.json"))
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
