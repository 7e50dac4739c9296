#!/usr/bin/env bash
# Browser tests need Debian's Chromium (driven by the Python playwright package,
# which never downloads a browser here), Node with npm (for `node --test` on the
# browser client's pure parts and for packing it), and TypeScript from the npm
# registry (the version tests/browser/js/package-lock.json pins) to check fanroute.js
# against its declarations. Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup-browser: $1 is missing; run this script as root to install it" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  shift
  apt-get install -y -q --no-install-recommends "$@"
}

# Fonts matter for the demo pages' screenshots: without any, text renders as boxes.
if [ ! -x /usr/bin/chromium ] || [ ! -d /usr/share/fonts/truetype/dejavu ]; then
  apt_install /usr/bin/chromium chromium fonts-dejavu-core
fi
if ! command -v node >/dev/null 2>&1; then
  apt_install node nodejs
fi
if ! command -v npm >/dev/null 2>&1; then
  apt_install npm npm
fi

tools=tests/browser/js
if [ ! -x "$tools/node_modules/.bin/tsc" ] || [ "$tools/package-lock.json" -nt "$tools/node_modules/.package-lock.json" ]; then
  npm ci --prefix "$tools" --no-audit --no-fund --loglevel=error
fi
