"""Console entry point ``apirouter``: serve, mock-backend, smoke, bench, version (apirouterctl:
ctl)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from apirouter import __version__
from apirouter.config import SETTINGS
from apirouter.config_keys import DEFAULT_PREFIX
from apirouter.runstate import RunDir, RunDirError, default_run_dir
from tools import mock_backend, smoke


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s pid=%(process)d %(message)s")


def _serve(args: argparse.Namespace) -> int:
    if sum(map(bool, (args.demo, args.config, args.etcd))) != 1:
        print("apirouter serve: give one of --config FILE, --etcd HOST:PORT, or --demo",
              file=sys.stderr)
        return 2
    # Claim the run directory first: a second router on it is refused before it touches
    # anything. Its metrics directory is set before anything imports prometheus_client, so
    # the supervisor's own metrics are written beside the workers' (an orphaned pool the
    # supervisor adopts keeps writing there too).
    try:
        run = RunDir.claim(args.run_dir)
    except RunDirError as e:
        print(f"apirouter serve: {e}", file=sys.stderr)
        return 2
    metrics_dir = run.metrics_dir
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from supervisor.main import ServeOptions, serve

    overrides = {s.name: getattr(args, s.name) for s in SETTINGS
                 if getattr(args, s.name, None) is not None}
    return serve(ServeOptions(args.config, args.demo, run.path, overrides, metrics_dir,
                              args.etcd, args.etcd_prefix, args.cache_dir, run))


def _add_bench(sub: Any) -> None:
    """`apirouter bench` (bench/suite.py), where this install has it: an image built from
    the runtime packages alone does not."""
    try:
        from bench import suite
    except ImportError as e:
        sub.add_parser("bench", help="SRE bench suite (not in this install)").set_defaults(
            bench_missing=str(e))
        return
    suite.add_arguments(sub.add_parser(
        "bench", help="SRE bench suite: load scenarios, SLO verdicts, a JSON + PNG report",
        description=suite.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    sub.choices["bench"].set_defaults(bench_missing="")


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
                       type=setting.parse, default=None,
                       help=f"{setting.doc} (default {setting.default}; env {setting.env})")

    m = sub.add_parser("mock-backend", help="run the OpenAI-compatible mock LLM backend")
    mock_backend.add_arguments(m)
    smoke.add_arguments(sub.add_parser("smoke", help="check a deployed router end to end"))
    _add_bench(sub)
    sub.add_parser("version", help="print the version")

    args = p.parse_args(argv)
    _setup_logging(args.log_level)
    if args.command == "serve":
        return _serve(args)
    if args.command == "mock-backend":
        return mock_backend.run(args)
    if args.command == "smoke":
        return smoke.run(args, out=lambda line: print(line, flush=True))
    if args.command == "bench":
        if args.bench_missing:
            print(f"apirouter bench: the bench package is not installed ({args.bench_missing})",
                  file=sys.stderr)
            return 2
        from bench import suite

        return suite.run(args)
    print(__version__)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
