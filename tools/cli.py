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
import tempfile
import time
from typing import Any

import yaml

from apirouter import __version__
from apirouter.config import SETTINGS, ConfigError
from apirouter.config_keys import DEFAULT_PREFIX
from apirouter.runstate import default_run_dir, pid_alive, read_state
from apirouter.shm import SegmentError, TableReader
from apirouter.table import decode_table
from tools import mock_backend


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s pid=%(process)d %(message)s")


def _serve(args: argparse.Namespace) -> int:
    if sum(map(bool, (args.demo, args.config, args.etcd))) != 1:
        print("apirouter serve: give one of --config FILE, --etcd HOST:PORT, or --demo",
              file=sys.stderr)
        return 2
    # A fresh metrics directory, set before anything imports prometheus_client, so the
    # supervisor's own metrics are written beside the workers'.
    metrics_dir = tempfile.mkdtemp(prefix="apirouter-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from supervisor.main import ServeOptions, serve

    overrides = {s.name: getattr(args, s.name) for s in SETTINGS
                 if getattr(args, s.name, None) is not None}
    return serve(ServeOptions(args.config, args.demo, args.run_dir, overrides, metrics_dir,
                              args.etcd, args.etcd_prefix, args.cache_dir))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="apirouter", description="LLM inference router")
    p.add_argument("--log-level", default=os.environ.get("APIROUTER_LOG_LEVEL", "info"))
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the supervisor and its worker pool")
    s.add_argument("--config", help="YAML config file (re-read on SIGHUP)")
    s.add_argument("--demo", action="store_true",
                   help="start two mock backends and route the demo models to them")
    s.add_argument("--etcd", metavar="HOST:PORT",
                   help="take the config from etcd (watched) instead of a file")
    s.add_argument("--etcd-prefix", default=DEFAULT_PREFIX, help="key prefix of the config")
    s.add_argument("--cache-dir", help="where the last good etcd config is kept "
                                       "(default: RUN_DIR/cache)")
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
        "config_store": state.get("config_store"),
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


def _wait_for_new_state(run_dir: str, before: dict[str, Any],
                        timeout: float = 10.0) -> dict[str, Any] | None:
    """The state file once the supervisor has published after ``before`` (it writes it last)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_state(run_dir)
        if state["generation"] != before["generation"]:
            return state
        time.sleep(0.02)
    return None


def _config(args: argparse.Namespace) -> int:
    import aetcd  # only operators' config commands need the etcd client

    from tools import config_store_cli

    try:
        if args.action == "push":
            if not args.file:
                print("apirouterctl config push FILE", file=sys.stderr)
                return 2
            _print(config_store_cli.run_push(args.etcd, args.prefix, args.file), args.json)
        else:
            raw, revision = config_store_cli.run_get(args.etcd, args.prefix)
            if args.json:
                print(json.dumps({"revision": revision, "config": raw}, indent=2))
            else:
                print(f"# etcd {args.etcd} prefix {args.prefix} revision {revision}")
                print(yaml.safe_dump(raw, sort_keys=False), end="")
    except ConfigError as e:
        print(f"config rejected: {e}", file=sys.stderr)
        return 1
    except (OSError, TimeoutError, aetcd.ClientError) as e:
        print(f"etcd {args.etcd} unreachable: {e}", file=sys.stderr)
        return 3
    return 0


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
    cfg = sub.add_parser("config", help="the config in etcd: push a YAML file, or get it")
    cfg.add_argument("action", choices=("push", "get"))
    cfg.add_argument("file", nargs="?", help="YAML config to push")
    cfg.add_argument("--etcd", default=os.environ.get("APIROUTER_ETCD", "127.0.0.1:2379"),
                     metavar="HOST:PORT")
    cfg.add_argument("--prefix", default=DEFAULT_PREFIX)
    args = p.parse_args(argv)

    if args.command == "config":
        return _config(args)
    state = _load_state(args.run_dir)
    pid = int(state["pid"])
    if args.command == "status":
        _print(_status(state), args.json)
    elif args.command == "dump-table":
        _print(_read_table(state)[1], args.json)
    elif args.command == "reload":
        os.kill(pid, signal.SIGHUP)
        after = _wait_for_new_state(args.run_dir, state)
        if after is None:
            print("the supervisor did not publish within 10 s (see its log)", file=sys.stderr)
            return 1
        if after["reload_failures"] > state["reload_failures"]:
            reason = (after.get("config_store") or {}).get("rejected", {}).get("reason")
            print(f"reload rejected, the running config stays: {reason}", file=sys.stderr)
            return 1
        _print({"reloaded": True, "generation": after["generation"]}, args.json)
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
