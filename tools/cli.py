"""Console entry points: ``apirouter`` (serve, mock-backend, version) and ``apirouterctl``.

``apirouterctl`` finds a running router through the supervisor's state file in the run
directory, talks to it with the classic signals, and reads the live routing table straight
from shared memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from typing import Any

from apirouter import __version__
from apirouter.config import SETTINGS
from apirouter.runstate import default_run_dir, pid_alive, read_state
from apirouter.shm import SegmentError, TableReader
from apirouter.table import decode_table
from tools import mock_backend


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s pid=%(process)d %(message)s")


def _serve(args: argparse.Namespace) -> int:
    from supervisor.main import ServeOptions, serve

    if not args.demo and not args.config:
        print("apirouter serve: give --config FILE, or --demo for the embedded demo",
              file=sys.stderr)
        return 2
    overrides = {s.name: getattr(args, s.name) for s in SETTINGS
                 if getattr(args, s.name, None) is not None}
    return serve(ServeOptions(args.config, args.demo, args.run_dir, overrides))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="apirouter", description="LLM inference router")
    p.add_argument("--log-level", default=os.environ.get("APIROUTER_LOG_LEVEL", "info"))
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the supervisor and its worker pool")
    s.add_argument("--config", help="YAML config file (re-read on SIGHUP)")
    s.add_argument("--demo", action="store_true",
                   help="start two mock backends and route the demo models to them")
    s.add_argument("--run-dir", default=default_run_dir(),
                   help="where the state file for apirouterctl lives")
    for setting in SETTINGS:
        s.add_argument(f"--{setting.name.replace('_', '-')}", dest=setting.name,
                       type=setting.type, default=None,
                       help=f"{setting.doc} (default {setting.default}; env {setting.env})")

    m = sub.add_parser("mock-backend", help="run the OpenAI-compatible mock LLM backend")
    mock_backend.add_arguments(m)
    sub.add_parser("version", help="print the version")

    args = p.parse_args(argv)
    _setup_logging(args.log_level)
    if args.command == "serve":
        return _serve(args)
    if args.command == "mock-backend":
        return mock_backend.run(args)
    print(__version__)
    return 0


# -- apirouterctl ---------------------------------------------------------------------------


def _load_state(run_dir: str) -> dict[str, Any]:
    try:
        state = read_state(run_dir)
    except FileNotFoundError:
        raise SystemExit(f"apirouterctl: no router is running with run dir {run_dir}") from None
    if not pid_alive(int(state["pid"])):
        raise SystemExit(f"apirouterctl: supervisor pid {state['pid']} is not running "
                         f"(stale state in {run_dir})")
    return state


def _read_table(state: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    reader = TableReader(state["table_segment"])
    try:
        gen, payload = reader.read()
    finally:
        reader.close()
    table = decode_table(payload)
    return gen, {
        "generation": gen,
        "source": table.source,
        "compiled_at": table.compiled_at,
        "limits": {k: getattr(table.limits, k) for k in table.limits.__slots__},
        "backends": {b.id: {"url": b.url, "timeout_s": b.timeout_s}
                     for b in table.backends.values()},
        "models": {r.model: [{"backend": b, "weight": w}
                             for b, w in zip(r.backend_ids, r.weights, strict=True)]
                   for r in table.routes.values()},
    }


def _status(state: dict[str, Any]) -> dict[str, Any]:
    try:
        gen, table = _read_table(state)
    except SegmentError as e:
        gen, table = -1, {"error": str(e)}
    workers = _children(state.get("gunicorn_pid"))
    return {
        "supervisor_pid": state["pid"],
        "gunicorn_pid": state.get("gunicorn_pid"),
        "worker_pids": workers,
        "bind": state["bind"],
        "source": state["source"],
        "table_generation": gen,
        "backends": len(table.get("backends", {})),
        "models": sorted(table.get("models", {})),
        "reload_failures": state.get("reload_failures", 0),
        "uptime_s": round(time.time() - state["started_at"], 1),
        "version": state.get("version"),
    }


def _children(pid: int | None) -> list[int]:
    if not pid:
        return []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _print(obj: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, sort_keys=True))
        return
    for k, v in obj.items():
        if isinstance(v, dict):
            print(f"{k}:")
            for k2, v2 in v.items():
                print(f"  {k2}: {json.dumps(v2) if isinstance(v2, dict | list) else v2}")
        else:
            print(f"{k}: {', '.join(map(str, v)) if isinstance(v, list) else v}")


def _wait_generation(state: dict[str, Any], before: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gen, _ = _read_table(state)
        if gen != before:
            return gen
        time.sleep(0.02)
    return before


def ctl_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="apirouterctl", description="operate a running apirouter")
    p.add_argument("--run-dir", default=default_run_dir())
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="supervisor, workers, table generation")
    sub.add_parser("reload", help="re-read the config and publish a new table (SIGHUP)")
    sub.add_parser("stop", help="drain in-flight requests and stop (SIGTERM)")
    scale = sub.add_parser("scale", help="add or remove workers (SIGTTIN/SIGTTOU)")
    scale.add_argument("direction", choices=("up", "down"))
    scale.add_argument("count", type=int, nargs="?", default=1)
    sub.add_parser("dump-table", help="print the live routing table from shared memory")
    args = p.parse_args(argv)

    state = _load_state(args.run_dir)
    pid = int(state["pid"])
    if args.command == "status":
        _print(_status(state), args.json)
    elif args.command == "dump-table":
        _print(_read_table(state)[1], args.json)
    elif args.command == "reload":
        before, _ = _read_table(state)
        os.kill(pid, signal.SIGHUP)
        after = _wait_generation(state, before)
        if after == before:
            print(f"reload rejected or not yet applied; generation {before} stays "
                  "(see the supervisor log)", file=sys.stderr)
            return 1
        _print({"reloaded": True, "generation": after}, args.json)
    elif args.command == "stop":
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        _print({"stopped": not pid_alive(pid)}, args.json)
    elif args.command == "scale":
        sig = signal.SIGTTIN if args.direction == "up" else signal.SIGTTOU
        for _ in range(max(0, args.count)):
            os.kill(pid, sig)
        _print({"signalled": args.count, "direction": args.direction}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
