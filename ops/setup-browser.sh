#!/usr/bin/env bash
# Browser tests need Debian's Chromium (driven by the Python playwright package,
# which never downloads a browser here) and Node (for `node --test` on the
# browser client's pure parts). Safe to run again: it installs only what is missing.
set -euo pipefail

# Fonts matter for the demo pages' screenshots: without any, text renders as boxes.
if [ ! -x /usr/bin/chromium ] || [ ! -d /usr/share/fonts/truetype/dejavu ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup-browser: /usr/bin/chromium is missing; run this script as root to install it" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
fi

if ! command -v node >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup-browser: node is missing; run this script as root to install it" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends nodejs
fi
