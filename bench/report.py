"""The bench suite's output: a progress bar while it runs, a summary table and SLO verdicts at
the end, and a report directory: report.json (every figure, the run's parameters, machine and
versions; checked against report.schema.json) and PNG plots (see bench/plots.py)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from apirouter import __version__
from bench.loadgen import Schedule
from bench.scenarios import Scenario
from bench.slo import Verdict, failed

SCHEMA_PATH = Path(__file__).with_name("report.schema.json")
SCHEMA_ID = "apirouter-bench-report/1"


def console() -> Console:
    con = Console(highlight=False)
    if not con.is_terminal:  # a log file or a pipe: wide enough for the tables
        con = Console(highlight=False, width=150)
    return con


def progress(con: Console, disabled: bool) -> AbstractContextManager[Progress]:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("errors {task.fields[errors]}"), TimeElapsedColumn(),
                    console=con, disable=disabled or not con.is_terminal)


def phase_line(schedule: Schedule) -> str:
    return ", ".join(f"{p.name} {p.rate:g}/s for {p.duration_s:g} s" for p in schedule.phases)


def comparison(legs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Router and nginx against the direct path, same run and load: added latency per
    percentile, latency and throughput ratios, server CPU per request and its ratio."""
    direct = legs.get("direct")
    if direct is None or len(legs) < 2 or not direct["latency_ms"]:
        return None
    out: dict[str, Any] = {"basis": "same run, identical load; differences of percentiles",
                           "legs": {}, "added_ms": {}, "latency_ratio": {},
                           "throughput_ratio": {}}
    for name, leg in legs.items():
        lat = leg["latency_ms"] or {}
        out["legs"][name] = {"p50_ms": lat.get("p50"), "p95_ms": lat.get("p95"),
                             "p99_ms": lat.get("p99"),
                             "throughput_ok_rps": leg["throughput_ok_rps"],
                             "cpu_us_per_request": leg.get("server_cpu_us_per_request")}
        if name == "direct" or not lat:
            continue
        d = direct["latency_ms"]
        out["added_ms"][name] = {p: lat[p] - d[p] for p in ("p50", "p95", "p99")}
        out["latency_ratio"][name] = {p: lat[p] / d[p] if d[p] else None
                                      for p in ("p50", "p95", "p99")}
        out["throughput_ratio"][name] = (leg["throughput_ok_rps"] / direct["throughput_ok_rps"]
                                         if direct["throughput_ok_rps"] else None)
        for key in ("ttft_ms", "event_gap_ms"):  # streams: what the hop adds per event
            if leg[key] and direct[key]:
                out.setdefault(f"added_{key}", {})[name] = {
                    p: leg[key][p] - direct[key][p] for p in ("p50", "p95", "p99")}
    r, n = out["legs"].get("router"), out["legs"].get("nginx")
    out["router_cpu_to_nginx"] = (r["cpu_us_per_request"] / n["cpu_us_per_request"]
                                  if r and n and r["cpu_us_per_request"]
                                  and n["cpu_us_per_request"] else None)
    return out


class Report:
    def __init__(self, sc: Scenario, args: argparse.Namespace, schedule: Schedule, rate: float,
                 duration: float, limits: dict[str, float]) -> None:
        self.scenario = sc
        self.args = args
        self.schedule = schedule
        self.started = datetime.now(UTC)
        self.parameters = {k: v for k, v in vars(args).items() if k not in ("key", "func")}
        self.parameters.update(rate=rate, duration=duration, **limits)
        self.environment: dict[str, Any] = {}
        self.legs: dict[str, dict[str, Any]] = {}
        self.comparison: dict[str, Any] | None = None
        self.scenario_facts: dict[str, float | None] = {}
        self.skips: list[tuple[str, str]] = []

    def skip(self, what: str, why: str) -> None:
        self.skips.append((what, why))

    def document(self, verdicts: list[Verdict], fail_on: str, plots: list[str]) -> dict[str, Any]:
        columns = ("seed", "scenario", "project") if fail_on == "project" else ("seed",
                                                                                 "scenario")
        return {
            "schema": SCHEMA_ID,
            "scenario": {"name": self.scenario.name, "about": self.scenario.about,
                         "legs": list(self.scenario.legs),
                         "expected_statuses": list(self.scenario.expected)},
            "started_at": self.started.isoformat(),
            "finished_at": datetime.now(UTC).isoformat(),
            "parameters": self.parameters,
            "phases": [{"name": p.name, "start_s": a, "end_s": b, "rate": p.rate}
                       for p, (a, b) in zip(self.schedule.phases, self.schedule.bounds,
                                            strict=True)],
            "machine": machine(), "versions": versions(),
            "environment": self.environment,
            "legs": self.legs, "comparison": self.comparison,
            "scenario_facts": self.scenario_facts,
            "slo": [v.as_dict() for v in verdicts],
            "skipped": [{"what": w, "why": y} for w, y in self.skips],
            "fail_on": list(columns),
            "passed": not failed(verdicts, columns),
            "plots": plots,
        }

    def finish(self, out: Path, verdicts: list[Verdict], con: Console, fail_on: str,
               plots: bool) -> int:
        out.mkdir(parents=True, exist_ok=True)
        written: list[str] = []
        if plots and self.legs:
            from bench import plots as plotmod

            written = plotmod.write_all(out, self.legs, self.schedule, self.comparison,
                                        self.scenario.name)
        doc = self.document(verdicts, fail_on, written)
        validate(doc)
        (out / "report.json").write_text(json.dumps(doc, indent=1, default=_json_default))
        print_summary(con, doc, verdicts)
        con.print(f"report: {out}/report.json" + (f" and {len(written)} plots" if written
                                                  else ""))
        return 0 if doc["passed"] else 1


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def validate(doc: dict[str, Any]) -> None:
    """Check a report against report.schema.json (jsonschema, when installed)."""
    try:
        import jsonschema
    except ImportError:
        return
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.validate(json.loads(json.dumps(doc, default=_json_default)), schema)


def machine() -> dict[str, Any]:
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f
                              if ln.startswith("model name")), "")
    except OSError:
        pass
    try:
        import psutil

        mem = psutil.virtual_memory().total
    except ImportError:
        mem = None
    return {"hostname": platform.node(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "cpu_model": cpu_model, "memory_bytes": mem,
            "load_average": list(os.getloadavg()), "python": sys.version.split()[0],
            "interpreter": interpreter()}


def interpreter() -> dict[str, Any]:
    """Which Python build ran the router (the benchmark starts it with its own interpreter).
    It matters: on the 2-core VM, Debian's python3.11 (statically linked, built with PGO and
    LTO, as the python:3.11 image the Dockerfile uses is) runs the router ~10% cheaper than a
    plain ``./configure --enable-shared`` build of the same version (tools/setup.sh)."""
    libpython = None
    try:
        with open("/proc/self/maps") as f:
            libpython = next((ln.split()[-1] for ln in f if "/libpython3" in ln), None)
    except OSError:
        pass
    return {"executable": os.path.realpath(sys.executable), "version": sys.version.split()[0],
            "libpython": libpython,  # None: the interpreter is linked statically
            "compiler": platform.python_compiler()}


def _tool_version(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None and not os.access(cmd[0], os.X_OK):
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (r.stdout + r.stderr).strip().splitlines()[0] if (r.stdout + r.stderr) else None


def versions() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {"apirouter": __version__}
    for dist in ("aiohttp", "hdrhistogram", "matplotlib", "rich", "uvloop"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    root = Path(__file__).resolve().parent.parent
    out["git_commit"] = _tool_version(["git", "-C", str(root), "rev-parse", "HEAD"])
    out["nginx"] = _tool_version([shutil.which("nginx") or "/usr/sbin/nginx", "-v"])
    out["redis_server"] = _tool_version(["redis-server", "--version"])
    return out


def _f(v: Any, digits: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def print_summary(con: Console, doc: dict[str, Any], verdicts: list[Verdict]) -> None:
    legs = doc["legs"]
    if legs:
        since = ("the scheduled send time" if doc["parameters"]["mode"] == "open" else
                 "the send (closed loop)")
        t = Table(title=f"{doc['scenario']['name']}: latency from {since} (ms)")
        for col in ("leg", "target/s", "sent/s", "ok", "refused", "errors", "p50", "p95",
                    "p99", "max", "server CPU µs/req", "generator CPU µs/req"):
            t.add_column(col, justify="left" if col == "leg" else "right")
        for name, leg in legs.items():
            lat = leg["latency_ms"] or {}
            r = leg["requests"]
            t.add_row(name, _f(leg["target_rate"]), _f(leg["achieved_rate"]), _f(r["ok"]),
                      _f(r["refused"]), f"{r['errors']} ({leg['error_rate']:.2%})",
                      _f(lat.get("p50"), 2), _f(lat.get("p95"), 2), _f(lat.get("p99"), 2),
                      _f(lat.get("max"), 2), _f(leg.get("server_cpu_us_per_request")),
                      _f(leg["generator"]["cpu_us_per_request"]))
        con.print(t)
        if len(doc["phases"]) > 1 and doc["parameters"]["mode"] == "open":
            t = Table(title="per phase (by scheduled time; latency ms)")
            for col in ("leg", "phase", "target/s", "sent/s", "ok", "errors", "p50", "p99"):
                t.add_column(col, justify="left" if col in ("leg", "phase") else "right")
            for name, leg in legs.items():
                for ph in leg["phases"]:
                    t.add_row(name, ph["name"], _f(ph["target_rate"]), _f(ph["sent_rate"]),
                              _f(ph["ok"]), f"{ph['errors']} ({ph['error_rate']:.2%})",
                              _f(ph["p50_ms"], 2), _f(ph["p99_ms"], 2))
            con.print(t)
        for name, leg in legs.items():
            extra = []
            if leg["ttft_ms"]:
                extra.append(f"TTFT p50 {leg['ttft_ms']['p50']:.2f} / p99 "
                             f"{leg['ttft_ms']['p99']:.2f} ms")
            if leg["event_gap_ms"]:
                extra.append(f"event gap p50 {leg['event_gap_ms']['p50']:.2f} / p99 "
                             f"{leg['event_gap_ms']['p99']:.2f} ms")
            if leg["overhead_header_ms"]:
                o = leg["overhead_header_ms"]
                extra.append(f"overhead from X-Router-Latency-Ms p50 {o['p50']:.3f} / p99 "
                             f"{o['p99']:.3f} ms")
            if extra:
                con.print(f"  {name}: " + "; ".join(extra))
        for leg in legs.values():
            g = leg["generator"]
            lag = g["lag_ms"] or {}
            style = "" if g["sustained"] else "[bold red]"
            con.print(f"  {style}{g['statement']}{'[/]' if style else ''}; send delay p50 "
                      f"{_f(lag.get('p50'), 3)} / p99 {_f(lag.get('p99'), 3)} ms")
    cmp = doc["comparison"]
    if cmp:
        for name, added in cmp["added_ms"].items():
            ratio = cmp["latency_ratio"][name]["p50"]
            tput = cmp["throughput_ratio"][name]
            con.print(f"  {name} vs direct: {added['p50']:+.3f} ms p50, {added['p99']:+.3f} ms "
                      f"p99 (x{_f(ratio, 2)} p50 latency, x{_f(tput, 2)} throughput)")
        for name, added in cmp.get("added_ttft_ms", {}).items():
            gap = cmp.get("added_event_gap_ms", {}).get(name)
            con.print(f"  {name} vs direct, streams: time to first token {added['p50']:+.3f} ms "
                      f"p50" + (f", gap between events {gap['p50']:+.3f} ms p50" if gap else ""))
        if cmp["router_cpu_to_nginx"]:
            con.print(f"  router CPU per request = {cmp['router_cpu_to_nginx']:.1f} x nginx's")
    if verdicts:
        t = Table(title="SLO verdicts")
        for col in ("column", "SLO", "limit", "measured", "verdict", "note"):
            t.add_column(col)
        for v in verdicts:
            s = v.slo
            mark = {True: "[green]PASS[/]", False: "[bold red]FAIL[/]", None: "n/a"}[v.passed]
            measured = "n/a" if v.measured is None else (
                f"{v.measured:.2%}" if s.unit == "ratio" else f"{v.measured:,.3f}")
            limit = f"{s.limit:.0%}" if s.unit == "ratio" else f"{s.limit:g}"
            t.add_row(s.column, s.what, f"{s.op} {limit} {s.unit if s.unit != 'ratio' else ''}",
                      measured, mark, v.note)
        con.print(t)
    for s in doc["skipped"]:
        con.print(f"[yellow]SKIP {s['what']}[/]: {s['why']}")
    verdict = "PASSED" if doc["passed"] else "FAILED"
    con.print(f"[bold]{doc['scenario']['name']}: {verdict}[/] (exit status set by: "
              f"{', '.join(doc['fail_on'])})")

