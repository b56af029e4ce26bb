"""What each of the router's features costs a request: the router measured beside a copy of
itself with that feature taken out, in the same run.

    python -m bench.feature_cost                         # each feature, then all of them
    python -m bench.feature_cost --only usage,admission --rounds 5 --duration 4
    python -m bench.feature_cost --against ../main --rounds 7   # a change, priced the same way

A profile splits the worker's CPU by where its samples land (bench.profile_stages), and on a
small shared VM that split misleads: a feature costs more than its own frames - the cache
lines it evicts, the supervisor work it feeds, the wake-ups it causes - and part of its cost
lands in frames that are not its own (py-spy put a third of the worker's CPU in the socket
writes, which bench.floor_proxy makes too, for a fraction of that). So this prices each feature
the other way round. A copy of the checkout has the feature taken out of its source (FEATURES:
exact edits, checked against the code by bench/test_feature_cost.py, so that they cannot
silently stop applying); that copy's router and a fresh one of this checkout run side by side
against the same mock, with bench.floor_proxy, and wrk loads them in turn at c=32 for
``--rounds`` rounds (floor, base, copy, then floor, copy, base: drift favours neither). A
feature's price is the median over the rounds of the base's CPU per request minus the copy's,
each pair measured seconds apart: the CPU per request of the same code moved by 15% between
runs ten minutes apart on this machine, more than most features cost; within a round, a pair
still moves by up to ~20 µs, which the rounds column shows.

Prices do not add up: taking one feature out leaves more of the caches to the others. The
"all" row takes every feature out together: what is left is the pipeline itself (parsing,
authentication, routing, forwarding, the response), and the floor is what is left of that
(its "own work" column: CPU per request minus the floor's). The copies are for measuring only;
nothing here changes the checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.overhead import BODY, LoadResult, bench_config, measure, run_wrk, wrk_script
from bench.procs import ROOT, FloorProxy, MockBackend, RedisServer, Router
from bench.report import interpreter

CHAT = "/v1/chat/completions"  # what every leg is loaded on
PACKAGES = ("apirouter", "workers", "supervisor", "tools", "bench")

# feature -> what taking it out means, and the edits that do it: (file, the exact text, what
# replaces it); each text must occur exactly once in its file.
Edit = tuple[str, str, str]
FEATURES: dict[str, tuple[str, list[Edit]]] = {
    "usage": ("no usage record: none written by the worker, so none exported (JSONL, audit)", [
        ("workers/accounting.py",
         "        usage = self.usage\n        if usage is not None:\n",
         "        usage = None\n        if usage is not None:\n")]),
    "admission": ("no admission: no bucket taken, no rate-limit headers, nothing settled", [
        ("workers/pipeline.py",
         "        caller, route, req = ctx.caller, ctx.route, ctx.request\n"
         "        if caller is None:\n",
         "        caller, route, req = ctx.caller, ctx.route, ctx.request\n"
         "        if True:\n")]),
    "metrics": ("no request metrics counted (the routed requests' counters and histograms;"
                " their tuples are still made)", [
        ("workers/accounting.py",
         "                self.metrics.routed_together(routed)",
         "                pass")]),
    "stats": ("no writes to the backend stats segment (in-flight counts, latency: routing's"
              " inputs)", [
        ("workers/app.py",
         "build_app(Pipeline(tables, stats, usage))",
         "build_app(Pipeline(tables, None, usage))")]),
}
ALL = "all"  # every feature out at once
AGAINST = "against"  # --against: the copy is another checkout, as it is


def edits_for(name: str) -> list[Edit]:
    if name == ALL:
        return [e for _, edits in FEATURES.values() for e in edits]
    return FEATURES[name][1]


def apply(root: Path, edits: list[Edit]) -> None:
    """Make ``edits`` in the copy at ``root``; each text must be there exactly once."""
    for rel, old, new in edits:
        path = root / rel
        text = path.read_text()
        if text.count(old) != 1:
            raise ValueError(f"{rel}: the text to replace occurs {text.count(old)} times, not "
                             f"once (bench.feature_cost.FEATURES is out of date): {old!r}")
        path.write_text(text.replace(old, new))


def copy_checkout(dest: Path) -> None:
    """The packages, with the built C extension, into ``dest`` (no caches, no results)."""
    ignore = shutil.ignore_patterns("__pycache__", "results", "*.pyc")
    for package in PACKAGES:
        shutil.copytree(ROOT / package, dest / package, ignore=ignore)


def price_rows(name: str, rounds: list[dict[str, LoadResult]]) -> dict[str, Any]:
    """One feature's row from its rounds, each a floor, a base and a copy measured in turn:
    medians, the price - the median of the rounds' base-minus-copy CPU per request - and each
    router's own work (the median of its rounds' CPU per request minus the floor's)."""
    def cpu(t: str) -> list[float]:
        values = [r[t].cpu_us_per_req for r in rounds]
        if None in values:  # a leg that served nothing: no figure, rather than a 0 µs one
            raise RuntimeError(f"{name}: the {t} leg served no request in a round")
        return values  # type: ignore[return-value]

    def sup(t: str) -> float:
        return statistics.median(r[t].supervisor_cpu_us_per_req or 0.0 for r in rounds)

    def paired(a: list[float], b: list[float]) -> list[float]:
        return [x - y for x, y in zip(a, b, strict=True)]

    base, copy, floor = cpu("base"), cpu("copy"), cpu("floor")
    prices = paired(base, copy)
    return {"name": name, "rounds": len(rounds),
            "base_cpu_us_per_req": statistics.median(base),
            "copy_cpu_us_per_req": statistics.median(copy),
            "base_supervisor_cpu_us_per_req": sup("base"),
            "copy_supervisor_cpu_us_per_req": sup("copy"),
            "floor_cpu_us_per_req": statistics.median(floor),
            "base_own_us_per_req": statistics.median(paired(base, floor)),
            "copy_own_us_per_req": statistics.median(paired(copy, floor)),
            "price_us_per_req": statistics.median(prices), "prices_us_per_req": prices,
            "errors": sum(r[t].errors for r in rounds for t in r)}


def runs_the_copy(router: Router, root: Path) -> bool:
    """Whether every process of ``router`` that loaded the bucket core loaded the copy's: a
    change to how the supervisor or gunicorn find their code would otherwise price this
    checkout against itself, silently."""
    import psutil

    tree = [psutil.Process(router.pid), *psutil.Process(router.pid).children(recursive=True)]
    paths = {m.path for p in tree for m in p.memory_maps() if "_bucketcore" in m.path}
    return bool(paths) and all(path.startswith(str(root)) for path in paths)


# The order of a round's legs, alternated (ABBA): drift during a round favours neither router.
ORDERS = (("floor", "base", "copy"), ("floor", "copy", "base"))


def measure_feature(name: str, floor: FloorProxy, config: dict[str, Any], script: str,
                    rounds: int, duration: float, against: Path | None = None
                    ) -> dict[str, Any]:
    """``name`` taken out of a copy (or, given ``against``, that other checkout as it is);
    its router and a fresh one of this checkout (the same age, the same requests served) are
    measured in turn with the floor, ``rounds`` times."""
    routers: list[Router] = []
    with tempfile.TemporaryDirectory(prefix=f"apirouter-cost-{name}-") as tmp:
        if against is not None:
            copy_root = against
        else:
            copy_root = Path(tmp) / "checkout"
            copy_checkout(copy_root)
            apply(copy_root, edits_for(name))
        try:
            routers.append(Router(config, workers=1))
            routers.append(Router(config, workers=1, root=copy_root))
            base, copy = routers
            if not runs_the_copy(copy, copy_root):
                raise RuntimeError(f"the router of the copy without {name} runs other code")
            legs = {"floor": (floor.url, floor.pid), "base": (base.url, base.pid),
                    "copy": (copy.url, copy.pid)}
            for router in routers:
                run_wrk(f"{router.url}{CHAT}", 32, 1.0, script)  # warm-up
            measured = [{t: measure(f"{legs[t][0]}{CHAT}",
                                    "floor" if t == "floor" else "router", 32, duration,
                                    script, legs[t][1]) for t in ORDERS[i % 2]}
                        for i in range(rounds)]
        finally:
            for router in routers:
                router.stop()
                router.cleanup()
    return price_rows(name, measured)


def render(rows: list[dict[str, Any]], rounds: int) -> str:
    lines = [f"{'taken out':>10} {'base':>7} {'copy':>7} {'price':>7} {'rounds':>30} "
             f"{'sup. base':>9} {'sup. copy':>9} {'floor':>6} {'own base':>8} {'own copy':>8}",
             f"{'':>10} (router CPU per request at c=32, µs; price: median of the {rounds} "
             f"rounds' base - copy)"]
    for r in rows:
        each = " ".join(f"{p:.1f}" for p in r["prices_us_per_req"])
        lines.append(f"{r['name']:>10} {r['base_cpu_us_per_req']:>7.1f} "
                     f"{r['copy_cpu_us_per_req']:>7.1f} {r['price_us_per_req']:>7.1f} "
                     f"{each:>30} {r['base_supervisor_cpu_us_per_req']:>9.1f} "
                     f"{r['copy_supervisor_cpu_us_per_req']:>9.1f} "
                     f"{r['floor_cpu_us_per_req']:>6.1f} {r['base_own_us_per_req']:>8.1f} "
                     f"{r['copy_own_us_per_req']:>8.1f}")
    lines.append("")
    lines += [f"{name}: {what}" for name, (what, _) in FEATURES.items()]
    lines.append(f"{ALL}: every one of them at once (what is left: the pipeline itself)")
    lines.append(f"{AGAINST}: the copy is the checkout given with --against (a negative price:"
                 " this checkout costs less)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.feature_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated features (default: each)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the three legs per copy")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per leg and round")
    p.add_argument("--redis", action="store_true",
                   help="admission through a redis-server (whose own CPU is not counted)")
    p.add_argument("--against", default="",
                   help="price this checkout against another one (a directory with its C "
                        "extension built) instead of against copies without a feature: "
                        "the price is this checkout's CPU a request minus that one's")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    if args.against:
        if args.only:
            p.error("--against prices one change; --only is for features")
        args.against = Path(args.against).resolve()
        if not (args.against / "workers" / "app.py").is_file():
            p.error(f"--against {args.against}: not a checkout of the router")
        names = [AGAINST]
    else:
        names = [n for n in args.only.split(",") if n] or [*FEATURES, ALL]
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    unknown = [n for n in names if n not in FEATURES and n not in (ALL, AGAINST)]
    if unknown:
        p.error(f"unknown feature(s) {', '.join(unknown)}; known: {', '.join(FEATURES)}, {ALL}")
    # Stopped with TERM (a timeout, an impatient operator): unwind, so that the routers and
    # the copies go too, rather than outliving the run.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _run(args, names)
    finally:
        signal.signal(signal.SIGTERM, previous)  # (main may be called from a test runner)


def _run(args: argparse.Namespace, names: list[str]) -> int:
    """The run itself: a mock, the floor, and each feature priced in turn (measure_feature)."""
    if shutil.which("wrk") is None:
        print("bench.feature_cost needs wrk: apt-get install -y wrk", file=sys.stderr)
        return 2
    mock = MockBackend("cost", "--models", "bench-model")
    procs: list[Any] = [mock]
    script = wrk_script(BODY)
    rows: list[dict[str, Any]] = []
    try:
        redis = RedisServer() if args.redis else None
        procs += [redis] if redis else []
        config = bench_config(mock.url, redis.url if redis else "")
        floor = FloorProxy(f"127.0.0.1:{mock.port}")
        procs.append(floor)
        run_wrk(f"{floor.url}{CHAT}", 32, 1.0, script.name)
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"feature-cost-{time.strftime('%Y%m%d-%H%M%S')}.json")
        for name in names:
            row = measure_feature(name, floor, config, script.name, args.rounds, args.duration,
                                  args.against or None)
            print(f"{name}: {row['price_us_per_req']:.1f} µs a request", flush=True)
            rows.append(row)
            with open(path, "w") as f:  # after each row: a later failure keeps the earlier
                json.dump({"admission": "redis" if args.redis else "in-process",
                           "connections": 32, "rounds": args.rounds,
                           "duration_s": args.duration, "cores": os.cpu_count(),
                           "interpreter": interpreter(), "results": rows}, f, indent=2)
    finally:
        for proc in reversed(procs):
            proc.stop()
            proc.cleanup()
        os.unlink(script.name)
    print(render(rows, args.rounds))
    print(f"\nwritten to {path}")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
