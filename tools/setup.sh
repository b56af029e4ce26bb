#!/usr/bin/env bash
# Prepares a fresh Debian machine for apirouter: system packages, a virtualenv, the package.
#   tools/setup.sh          runtime only (what `tools/demo.sh` needs)
#   tools/setup.sh test     plus redis-server, wrk and the test/lint/bench extras
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"

python=${PYTHON:-python3}
"$python" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
  || { echo "apirouter needs Python >= 3.11 (set PYTHON=...)" >&2; exit 1; }

if [ "$mode" = test ]; then
  missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v wrk >/dev/null || missing+=(wrk)
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$mode" = test ]; then
  .venv/bin/python -m pip install -q -e '.[test,lint,bench]'
else
  .venv/bin/python -m pip install -q -e .
fi
