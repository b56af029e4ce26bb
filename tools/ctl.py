"""``apirouterctl``: operate a running router through its control socket.

It finds the router through the supervisor's state file in the run directory, sends commands
over the control socket (length-prefixed JSON), and reads the live routing table straight from
shared memory for ``dump-table``. ``config push|get`` talk to etcd directly. Readable output
for people; ``--json`` for scripts. Exit codes: 0 done, 1 refused, 2 usage, 3 unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import yaml

from apirouter.config import ConfigError
from apirouter.config_keys import DEFAULT_PREFIX
from apirouter.control_protocol import SOCKET_NAME, CommandError, ProtocolError, call
from apirouter.runstate import default_run_dir, read_state, supervisor_alive
from apirouter.shm import TableReader
from apirouter.table import decode_table, describe


class CtlError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _state(run_dir: str) -> dict[str, Any]:
    try:
        state = read_state(run_dir)
    except FileNotFoundError:
        raise CtlError(f"no router is running with run dir {run_dir}", 3) from None
    if not supervisor_alive(run_dir):
        raise CtlError(f"supervisor pid {state['pid']} is not running (stale state in "
                       f"{run_dir})", 3)
    return state


def _call(run_dir: str, cmd: str, args: dict[str, Any] | None = None) -> Any:
    _state(run_dir)
    try:
        return asyncio.run(call(os.path.join(run_dir, SOCKET_NAME), cmd, args))
    except CommandError as e:
        raise CtlError(f"{e.code}: {e.message}") from None
    except (OSError, ProtocolError, TimeoutError) as e:
        raise CtlError(f"control socket in {run_dir} unreachable: {e}", 3) from None


def _table(run_dir: str) -> dict[str, Any]:
    state = _state(run_dir)
    reader = TableReader(state["table_segment"])
    try:
        gen, payload = reader.read()
    finally:
        reader.close()
    return {"generation": gen, **describe(decode_table(payload))}


def _print(obj: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, sort_keys=True, default=str))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, dict):
                print(f"{k}:")
                for k2, v2 in v.items():
                    print(f"  {k2}: {json.dumps(v2) if isinstance(v2, dict | list) else v2}")
            else:
                print(f"{k}: {', '.join(map(str, v)) if isinstance(v, list) else v}")
    elif isinstance(obj, list):
        for item in obj:
            print(json.dumps(item, sort_keys=True, default=str))
    else:
        print(obj)


def _weights(text: str) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (p.split("=", 1) for p in text.split(",") if p)}
    except ValueError:
        raise argparse.ArgumentTypeError("weights are BACKEND=N[,BACKEND=N...]") from None


def _config(args: argparse.Namespace) -> Any:
    import aetcd  # only the config commands need the etcd client

    from tools import config_store_cli

    try:
        if args.action == "push":
            if not args.file:
                raise CtlError("apirouterctl config push FILE", 2)
            return config_store_cli.run_push(args.etcd, args.prefix, args.file)
        raw, revision = config_store_cli.run_get(args.etcd, args.prefix)
    except ConfigError as e:
        raise CtlError(f"config rejected: {e}") from None
    except (OSError, TimeoutError, aetcd.ClientError) as e:
        raise CtlError(f"etcd {args.etcd} unreachable: {e}", 3) from None
    if args.json:
        return {"revision": revision, "config": raw}
    return f"# etcd {args.etcd} prefix {args.prefix} revision {revision}\n" + yaml.safe_dump(
        raw, sort_keys=False).rstrip()


def run(args: argparse.Namespace) -> Any:
    d = args.run_dir
    match args.command:
        case "status":
            return _call(d, "status")
        case "dump-table":
            return _table(d)
        case "reload":
            return _call(d, "reload")
        case "scale":
            return _call(d, "scale", {"delta": args.count if args.direction == "up"
                                      else -args.count})
        case "stop":
            _call(d, "stop")
            deadline = time.monotonic() + 60
            while supervisor_alive(d) and time.monotonic() < deadline:
                time.sleep(0.05)
            return {"stopped": not supervisor_alive(d)}
        case "drain" | "degrade":
            return _call(d, "overrides.set", {"kind": args.command, "target": args.backend,
                                              "ttl_s": args.ttl})
        case "undrain":
            cleared = [_call(d, "overrides.clear", {"id": o["id"]})["cleared"]
                       for o in _call(d, "overrides.list")
                       if o["kind"] in ("drain", "degrade") and o["target"] == args.backend]
            if not cleared:
                raise CtlError(f"backend {args.backend} is not drained or degraded")
            return {"cleared": cleared}
        case "pin":
            return _call(d, "overrides.set", {"kind": "pin", "target": args.model,
                                              "backend": args.backend, "ttl_s": args.ttl})
        case "weights":
            return _call(d, "overrides.set", {"kind": "weights", "target": args.model,
                                              "weights": args.weights, "ttl_s": args.ttl})
        case "overrides":
            if args.clear:
                return _call(d, "overrides.clear", {"id": args.clear})
            return _call(d, "overrides.list")
        case "audit":
            return _call(d, "audit.list", {"limit": args.limit})
        case "config":
            return _config(args)
        case "usage":
            return _call(d, "usage", {"replay": args.replay})
        case "keys":
            if args.action == "create":
                if not args.org:
                    raise CtlError("apirouterctl keys create --org ORG [...]", 2)
                return _call(d, "keys.create", {
                    "org": args.org, "team": args.team, "tier": args.tier, "hmac": args.hmac,
                    "scopes": [s for s in (args.scopes or "inference").split(",") if s]})
            if args.action == "revoke":
                if not args.key_id:
                    raise CtlError("apirouterctl keys revoke KEY_ID", 2)
                return _call(d, "keys.revoke", {"key_id": args.key_id})
            return _call(d, "keys.list")
    raise CtlError(f"unknown command {args.command}", 2)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apirouterctl", description="operate a running apirouter")
    p.add_argument("--run-dir", default=default_run_dir())
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="workers, table generation, config store, backend health")
    u = sub.add_parser("usage", help="usage export: sink, spool, audit store")
    u.add_argument("--replay", action="store_true",
                   help="reconnect to Kafka and replay the disk spool now")
    sub.add_parser("dump-table", help="the live routing table, read from shared memory")
    sub.add_parser("reload", help="re-read the config (file) or resync with etcd")
    sub.add_parser("stop", help="drain in-flight requests and stop")
    scale = sub.add_parser("scale", help="add or remove workers")
    scale.add_argument("direction", choices=("up", "down"))
    scale.add_argument("count", type=int, nargs="?", default=1)
    for kind, text in (("drain", "send a backend no new traffic"),
                       ("degrade", "use a backend only when nothing better is left")):
        s = sub.add_parser(kind, help=text)
        s.add_argument("backend")
        s.add_argument("--ttl", type=float, help="seconds until it lifts by itself")
    sub.add_parser("undrain", help="lift drain/degrade overrides of a backend").add_argument(
        "backend")
    pin = sub.add_parser("pin", help="route a model to one backend first")
    pin.add_argument("model")
    pin.add_argument("backend")
    pin.add_argument("--ttl", type=float)
    w = sub.add_parser("weights", help="override a model's weights")
    w.add_argument("model")
    w.add_argument("weights", type=_weights, help="BACKEND=N[,BACKEND=N...]")
    w.add_argument("--ttl", type=float)
    o = sub.add_parser("overrides", help="list overrides, or --clear ID")
    o.add_argument("--clear", metavar="ID")
    a = sub.add_parser("audit", help="recent override changes: who, what, when")
    a.add_argument("--limit", type=int, default=50)
    k = sub.add_parser("keys", help="API keys: create (shown once), list, revoke")
    k.add_argument("action", choices=("create", "list", "revoke"))
    k.add_argument("key_id", nargs="?", help="with revoke")
    k.add_argument("--org")
    k.add_argument("--team")
    k.add_argument("--scopes", help="comma-separated: inference,audit,admin")
    k.add_argument("--tier")
    k.add_argument("--hmac", action="store_true", help="require HMAC-signed requests")
    cfg = sub.add_parser("config", help="the config in etcd: push a YAML file, or get it")
    cfg.add_argument("action", choices=("push", "get"))
    cfg.add_argument("file", nargs="?", help="YAML config to push")
    cfg.add_argument("--etcd", default=os.environ.get("APIROUTER_ETCD", "127.0.0.1:2379"),
                     metavar="HOST:PORT")
    cfg.add_argument("--prefix", default=DEFAULT_PREFIX)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        _print(run(args), args.json)
    except CtlError as e:
        print(f"apirouterctl: {e}", file=sys.stderr)
        return e.code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
