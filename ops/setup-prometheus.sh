#!/usr/bin/env bash
# The observability tests run Debian's Prometheus and its promtool against a local
# cluster and the rules in ops/prometheus/. Safe to run again: it installs only what
# is missing. The package's service is not started (tests start their own server).
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "setup-prometheus: prometheus/promtool are missing; run this script as root to install them" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# policy-rc.d keeps the package's own service from starting where one exists already;
# a temporary one is added only when the image has none.
added_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  added_policy=1
fi
cleanup() { if [ -n "$added_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT
apt-get install -y -q --no-install-recommends prometheus
