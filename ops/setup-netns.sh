#!/usr/bin/env bash
# The partition tests (tests/system/test_partitions.py) put routers and gateways in
# network namespaces of their own and cut links between them with iptables DROP
# rules (this kernel has no netem). They need Debian's iptables and iproute2, and
# root. Safe to run again: it installs only what is missing.
set -euo pipefail

if command -v iptables >/dev/null 2>&1 && command -v ip >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "setup-netns: iptables or ip is missing; run this script as root to install them" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends iptables iproute2
