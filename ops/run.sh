#!/usr/bin/env bash
# One command: set everything up and start the standalone server (gateway + 4 shards).
# Extra arguments go to `fanroute standalone` (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
ops/setup.sh
exec .venv/bin/fanroute standalone "$@"
