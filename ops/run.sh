#!/usr/bin/env bash
# One command: set everything up and start the standalone server (gateway + 4 shards)
# with the demo price feed.
# Extra arguments go to `fanroute standalone` (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
ops/setup.sh
# --demo-feed keeps the ticker page (http://127.0.0.1:8080/ticker.html) moving.
exec .venv/bin/fanroute standalone --demo-feed 2 "$@"
