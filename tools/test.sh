#!/usr/bin/env bash
# The one command that sets up a fresh machine and runs the whole test suite: lint, types,
# unit/property/integration tests against real redis-server, etcd and a Kafka-protocol broker
# (started by the tests on loopback ports), and the microbenchmarks run once as tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh test
.venv/bin/ruff check --line-length 100 --target-version py311 --select E,F,W,I,B,UP \
  apirouter workers supervisor tools bench tests
.venv/bin/mypy
.venv/bin/pytest -q --benchmark-disable "$@"
