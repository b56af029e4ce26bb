"""`apirouter bench SCENARIO`: the SRE bench suite.

    apirouter bench baseline --local                 # router vs nginx vs the backend, same run
    apirouter bench burst --local --rate 200 --burst-factor 5
    apirouter bench peak --target https://router.example --key $KEY [--direct URL]
    apirouter bench rate-limit --local               # 429s exactly where the bucket says
    apirouter bench streaming --local --smoke        # a few seconds of every leg

Open loop by default: requests arrive at a fixed rate whatever the target does, and latency
runs from each request's scheduled send time, so a stalling target is charged for the queue it
builds; ``--mode closed`` runs N clients back to back for a throughput ceiling instead. Each
run ends with a summary table, SLO verdicts (seed NFRs; the project's targets beside them) and
a report directory (report.json, PNG plots). Exit status 1 when an SLO or scenario check fails,
2 when the run could not be made.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvloop

from bench import environment as envmod
from bench.loadgen import (
    WITHHELD,
    RunStats,
    Sample,
    Schedule,
    clock,
    closed_loop,
    open_loop,
)
from bench.procs import process_tree_cpu
from bench.scenarios import (
    SCENARIOS,
    Scenario,
    budget_checks,
    failover_checks,
    rate_limit_checks,
)
from bench.slo import PROJECT_SLOS, SEED_SLOS, Verdict, evaluate

if TYPE_CHECKING:
    from bench.client import HttpTarget

CHAT_PATH = "/v1/chat/completions"
MAX_REQUESTS = 2_000_000  # per leg: every request is kept as a sample until the report
STREAM_BEHAVIOUR = {"first_event_ms": 20.0, "event_interval_ms": 5.0, "reply_tokens": 32}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", choices=sorted(SCENARIOS), help="which load scenario to run")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true",
                       help="start the router, mock backends, nginx (and redis) on loopback")
    where.add_argument("--target", metavar="URL", help="base URL of a running router")
    p.add_argument("--key", default=os.environ.get("APIROUTER_BENCH_KEY"),
                   help="API key for --target, sent as Authorization: Bearer (or "
                        "APIROUTER_BENCH_KEY, which keeps it out of ps and shell history)")
    p.add_argument("--direct", metavar="URL",
                   help="with --target: the backend behind it, for the same-run comparison")
    p.add_argument("--model", default=envmod.MODEL, help="model name in the requests")
    p.add_argument("--path", default=CHAT_PATH, choices=(CHAT_PATH, "/v1/inference"),
                   help="router endpoint (/v1/inference reports the backend's share exactly)")
    p.add_argument("--mode", choices=("open", "closed"), default="open",
                   help="open: fixed arrival rate (default); closed: --concurrency clients "
                        "back to back (throughput ceiling)")
    p.add_argument("--rate", type=float, help="arrival rate, requests/s (scenario default)")
    p.add_argument("--duration", type=float, help="seconds per leg (scenario default)")
    p.add_argument("--burst-factor", type=float, default=4.0, help="burst: rate multiplier")
    p.add_argument("--concurrency", type=int, default=64,
                   help="connections per leg (open: pool bound; closed: clients)")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request deadline, s")
    p.add_argument("--client", choices=("httptools", "aiohttp"), default="httptools",
                   help="the generator's HTTP client for http:// (https always uses aiohttp)")
    p.add_argument("--smoke", action="store_true", help="a few seconds per leg, low rates")
    p.add_argument("--workers", type=int, default=2, help="--local: router (and nginx) workers")
    p.add_argument("--backend-latency-ms", type=float, default=20.0,
                   help="--local: the mock backend's service time")
    p.add_argument("--redis", action="store_true",
                   help="--local: admission on redis-server (always for rate-limit, budget)")
    p.add_argument("--rpm", type=int, help="rate-limit: the key's requests/min (local "
                   "default 60; with --target, the limit of --key)")
    p.add_argument("--rpm-burst", type=int, help="rate-limit: the key's burst (default rpm)")
    p.add_argument("--budget", type=float, default=None,
                   help="budget: the key's spend budget (local default 5.0; smoke 0.5)")
    p.add_argument("--fail-on", choices=("seed", "project"), default="seed",
                   help="which SLO column sets the exit status (scenario checks always do)")
    p.add_argument("--out", help="report directory (default bench-reports/SCENARIO-TIME)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="JSON only")


def run(args: argparse.Namespace) -> int:
    try:  # the bench extra: apirouter serve runs without it
        from bench import report
    except ImportError as e:
        print(f"apirouter bench needs the bench extra: pip install 'apirouter[bench]' ({e})",
              file=sys.stderr)
        return 2

    sc = SCENARIOS[args.scenario]
    rate = args.rate or (sc.smoke_rate if args.smoke else sc.rate)
    duration = args.duration or (sc.smoke_duration_s if args.smoke else sc.duration_s)
    if rate <= 0 or duration <= 0 or args.concurrency < 1:
        print("apirouter bench: --rate, --duration and --concurrency must be positive",
              file=sys.stderr)
        return 2
    if rate * duration * (args.burst_factor if sc.name == "burst" else 1) > MAX_REQUESTS:
        print(f"apirouter bench: more than {MAX_REQUESTS:,} requests per leg; lower --rate or "
              "--duration", file=sys.stderr)
        return 2
    if args.target and not args.key:
        print("apirouter bench: --target needs --key", file=sys.stderr)
        return 2
    schedule = Schedule(sc.phases(rate, duration, args.burst_factor))
    rpm = args.rpm or (30 if args.smoke else 60)
    rpm_burst = args.rpm_burst or rpm
    budget = args.budget if args.budget is not None else (0.5 if args.smoke else 5.0)
    out = Path(args.out or f"bench-reports/{sc.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    rep = report.Report(sc, args, schedule, rate, duration,
                        {"rpm": rpm, "rpm_burst": rpm_burst, "budget": budget})
    console = report.console()
    console.print(f"[bold]apirouter bench {sc.name}[/]: {sc.about}; {args.mode} loop, "
                  f"{report.phase_line(schedule)}")
    skip = _scenario_skip(sc, args)
    if skip:
        rep.skip(sc.name, skip)
        console.print(f"[yellow]SKIP {sc.name}[/]: {skip}")
        return rep.finish(out, [], console, args.fail_on, plots=False)
    env: envmod.LocalEnv | envmod.TargetEnv
    try:
        if args.local:
            exact = sc.name in ("rate-limit", "budget")
            if (exact or args.redis) and not envmod.redis_available():
                console.print(f"[yellow]SKIP {sc.name}[/]: needs redis-server for exact "
                              "admission (tools/setup.sh test installs it)")
                rep.skip(sc.name, "redis-server is not installed")
                return rep.finish(out, [], console, args.fail_on, plots=False)
            want_nginx = "nginx" in sc.legs and envmod.nginx_available()
            if "nginx" in sc.legs and not want_nginx:
                rep.skip("nginx leg", "nginx is not installed (tools/setup.sh test installs it)")
            env = envmod.LocalEnv(
                workers=args.workers, backend_latency_ms=args.backend_latency_ms,
                two_backends=sc.name == "backend-failure", redis=exact or args.redis,
                nginx=want_nginx, rpm=rpm, rpm_burst=rpm_burst, budget=budget,
                stream_behaviour=STREAM_BEHAVIOUR if sc.name == "streaming" else None)
        else:
            env = envmod.TargetEnv(args.target, args.direct)
    except (OSError, TimeoutError, RuntimeError) as e:
        print(f"apirouter bench: could not start the local environment: {e}", file=sys.stderr)
        return 2
    rep.environment = env.description
    try:
        verdicts = uvloop.run(_run_legs(sc, args, env, schedule, rep, console,
                                         rpm, rpm_burst, budget))
    finally:
        env.close()
    return rep.finish(out, verdicts, console, args.fail_on, plots=not args.no_plots)


def _scenario_skip(sc: Scenario, args: argparse.Namespace) -> str:
    if args.local or not sc.local_only:
        if sc.name == "rate-limit" and args.target and not args.rpm:
            return ("against --target it needs the limit of --key (a key kept for this test): "
                    "pass --rpm N [--rpm-burst B], or run it with --local")
        return ""
    return f"{sc.local_only}, which only --local can do: apirouter bench {sc.name} --local"


def request_body(model: str, stream: bool, path: str) -> bytes:
    doc: dict[str, Any] = {"model": model, "messages": [
        {"role": "system", "content": "You are a terse assistant used for load testing."},
        {"role": "user", "content": "Summarise the benefits of keep-alive connections for a "
                                    "proxy in one sentence, please, and be brief about it."}],
        "max_tokens": 16 if not stream else 64}
    if path == CHAT_PATH:
        doc["temperature"] = 0
    if stream:
        doc.update(stream=True, stream_options={"include_usage": True})
    return json.dumps(doc).encode()


async def _run_legs(sc: Scenario, args: argparse.Namespace, env: Any, schedule: Schedule,
                    rep: Any, console: Any, rpm: int, rpm_burst: int, budget: float
                    ) -> list[Verdict]:
    from bench import report
    from bench.analysis import summarize

    urls: envmod.Urls = env.urls
    stream = sc.name == "streaming"
    key = args.key or {"rate-limit": envmod.LIMITED_KEY,
                       "budget": envmod.BUDGET_KEY}.get(sc.name, envmod.BENCH_KEY)
    body = request_body(args.model, stream, args.path)
    legs: dict[str, str] = {}
    for leg in sc.legs:
        base = getattr(urls, leg)
        if base is None:
            rep.skip(f"{leg} leg", "only with --local" if leg == "nginx" else
                     "give --direct URL (the backend behind the router) to compare")
            continue
        legs[leg] = base + (args.path if leg == "router" else CHAT_PATH)
    if stream and "router" in legs:
        why = await router_stream_skip(legs["router"], body, key)
        if why:
            rep.skip("router leg", why)
            del legs["router"]
    for what, why in rep.skips:
        console.print(f"[yellow]SKIP {what}[/]: {why}")
    summaries: dict[str, dict[str, Any]] = {}
    raw: dict[str, list[Sample]] = {}
    # The backend's own time up to what the router's header times: the whole answer, or for
    # a stream the head, which the router holds until the first event.
    service_ms = None
    if env.local:
        first = env.behaviour.get("first_event_ms", 0.0) if stream else 0.0
        service_ms = env.behaviour["latency_ms"] + (
            first if isinstance(first, int | float) else 0.0)
    with report.progress(console, disabled=args.no_progress) as bar:
        for leg, url in legs.items():
            samples, stats, cpu_us = await _one_leg(sc, args, env, leg, url, body, key,
                                                    schedule, bar)
            raw[leg] = samples
            s = summarize(leg, url, samples, stats, schedule if args.mode == "open" else None,
                          expected=sc.expected,
                          backend_service_ms=service_ms if leg == "router" else None)
            s["server_cpu_us_per_request"] = cpu_us
            eps = s["events_per_stream"]
            s["server_cpu_us_per_event"] = cpu_us / eps if cpu_us is not None and eps else None
            summaries[leg] = s
    rep.legs = summaries
    verdicts: list[Verdict] = []
    router = summaries.get("router")
    metrics: dict[str, float | None] = {}
    if router is not None:
        metrics.update(_router_metrics(router, summaries.get("direct"), sc))
    verdicts += evaluate(metrics, SEED_SLOS + PROJECT_SLOS,
                         {"ratelimit_decision_p95_ms": "429 latency seen by the client, from "
                          "the scheduled send: an upper bound of the decision"})
    if router is not None:
        checks, facts = _scenario_checks(sc, raw["router"], env, args, rpm, rpm_burst,
                                         budget, body, schedule)
        verdicts += checks
        rep.scenario_facts = facts
    rep.comparison = report.comparison(summaries)
    return verdicts


async def router_stream_skip(url: str, body: bytes, key: str) -> str:
    """Empty when the router streams (answers an SSE request with text/event-stream),
    else the line saying why its leg is skipped."""
    import aiohttp

    try:
        async with aiohttp.ClientSession() as s, s.post(
                url, data=body, headers={"Authorization": f"Bearer {key}",
                                         "Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=10)) as r:
            ctype = r.headers.get("Content-Type", "")
            await r.read()
    except (TimeoutError, aiohttp.ClientError) as e:
        return f"the router did not answer a stream request ({type(e).__name__})"
    if r.status == 200 and ctype.startswith("text/event-stream"):
        return ""
    return (f"the router does not stream yet (a stream request got {r.status} {ctype}); "
            "direct and nginx legs measured")


async def _one_leg(sc: Scenario, args: argparse.Namespace, env: Any, leg: str, url: str,
                   body: bytes, key: str, schedule: Schedule, bar: Any
                   ) -> tuple[list[Sample], RunStats, float | None]:
    from bench.client import HttpTarget, RetryAfterClient

    total = schedule.count if args.mode == "open" else None
    task = bar.add_task(f"{sc.name} {leg:>6}", total=total, errors=0)
    errors = 0

    def done(s: Sample) -> None:
        nonlocal errors
        if not 200 <= s.status < 300 and s.status not in sc.expected and s.status != WITHHELD:
            errors += 1
        bar.update(task, advance=1, errors=errors)

    target = HttpTarget(url, body, key=key, stream=sc.name == "streaming",
                        max_connections=args.concurrency, timeout_s=args.timeout,
                        want_usage=sc.name == "budget", lean=args.client == "httptools")
    pid = env.urls.cpu_pids.get(leg)
    async with target:
        if sc.name not in ("rate-limit", "budget"):  # they must start on a fresh bucket
            await _warm_up(target)
        send = (RetryAfterClient(target, wait=args.mode == "closed").send
                if sc.name == "rate-limit" else target.send)
        actions = (asyncio.ensure_future(_failure_actions(env, schedule))
                   if sc.name == "backend-failure" and env.local else None)
        cpu0 = process_tree_cpu(pid)[0] if pid else None
        if args.mode == "open":
            samples, stats = await open_loop(schedule, send, done)
        else:
            samples, stats = await closed_loop(args.concurrency, schedule.duration, send, done)
        cpu = process_tree_cpu(pid)[0] - cpu0 if pid and cpu0 is not None else None
        if actions is not None:
            await actions
    bar.update(task, completed=len(samples), total=len(samples))
    return samples, stats, cpu / stats.sent * 1e6 if cpu is not None and stats.sent else None


async def _warm_up(target: HttpTarget, n: int = 20) -> None:
    """Open the pool's connections and the router's backend connections first."""
    async def one() -> None:
        s = Sample(-1, 0.0)
        try:
            await target.send(s)
        except Exception:  # noqa: BLE001 - warm-up failures show up in the measured run
            pass

    await asyncio.gather(*(one() for _ in range(n)))


async def _failure_actions(env: Any, schedule: Schedule) -> None:
    """Kill backend b at the start of the failure phase; restart it for the last phase."""
    loop = asyncio.get_running_loop()
    start = clock() + 0.05  # open_loop's start delay
    for phase, action in ((1, env.kill_backend), (2, env.restart_backend)):
        await asyncio.sleep(max(0.0, start + schedule.bounds[phase][0] - clock()))
        await loop.run_in_executor(None, action, 1)


def _router_metrics(router: dict[str, Any], direct: dict[str, Any] | None, sc: Scenario
                    ) -> dict[str, float | None]:
    lat = router["latency_ms"] or {}
    m: dict[str, float | None] = {"latency_p95_ms": lat.get("p95"),
                                  "latency_p99_ms": lat.get("p99"),
                                  "error_rate": router["error_rate"]}
    head = router["overhead_header_ms"]
    dl = direct["latency_ms"] if direct else None
    for pct in ("p50", "p95", "p99"):
        m[f"overhead_{pct}_ms[router header]"] = head[pct] if head else None
        m[f"overhead_{pct}_ms[vs direct]"] = (lat[pct] - dl[pct]) if lat and dl else None
    if sc.name == "rate-limit":
        ref = router["refusal_latency_ms"]
        m["ratelimit_decision_p95_ms"] = ref["p95"] if ref else None
    if sc.name == "streaming" and direct and router["ttft_ms"] and direct["ttft_ms"]:
        m["added_ttft_p50_ms"] = router["ttft_ms"]["p50"] - direct["ttft_ms"]["p50"]
    return m


def _scenario_checks(sc: Scenario, samples: list[Sample], env: Any, args: argparse.Namespace,
                     rpm: int, rpm_burst: int, budget: float, body: bytes, schedule: Schedule
                     ) -> tuple[list[Verdict], dict[str, float | None]]:
    if sc.name == "rate-limit":
        return rate_limit_checks(samples, rpm, rpm_burst, fresh_bucket=env.local)
    if sc.name == "budget":
        from apirouter.limits import estimate_tokens

        price = envmod.PRICE
        tokens = estimate_tokens(len(body), 16, 256)
        reservation = tokens * max(price.values()) / 1000
        return budget_checks(samples, budget, price["prompt_per_1k"],
                             price["completion_per_1k"], reservation)
    if sc.name == "backend-failure" and env.local:
        return failover_checks(samples, 1)
    return [], {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="apirouter bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
