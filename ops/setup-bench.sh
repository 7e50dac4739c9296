#!/usr/bin/env bash
# The seed target of `fanroute bench` (ops/bench/seed/seed_server.js) runs on Node
# with the `ws` package from the npm registry, at the version
# ops/bench/seed/package-lock.json pins. Node and npm come from Debian's packages
# when missing. Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup-bench: $1 is missing; run this script as root to install it" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  shift
  apt-get install -y -q --no-install-recommends "$@"
}

if ! command -v node >/dev/null 2>&1; then
  apt_install node nodejs
fi
if ! command -v npm >/dev/null 2>&1; then
  apt_install npm npm
fi

seed=ops/bench/seed
if [ ! -f "$seed/node_modules/ws/package.json" ] || [ "$seed/package-lock.json" -nt "$seed/node_modules/.package-lock.json" ]; then
  npm ci --prefix "$seed" --no-audit --no-fund --loglevel=error
fi
