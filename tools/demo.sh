#!/usr/bin/env bash
# The one command from a fresh machine to a running router with two mock backends behind it.
# Then: curl http://127.0.0.1:8080/v1/chat/completions ... (see README). Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/apirouter serve --demo "$@"
