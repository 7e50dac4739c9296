#!/usr/bin/env bash
# One command: set everything up and run the whole test suite.
#
#   ops/test.sh                    every tier
#   ops/test.sh unit               the fast tier (pure modules, under a few seconds)
#   ops/test.sh unit integration   several tiers
#   ops/test.sh system -k faults   a tier, then pytest's own arguments
#
# Tiers (folders of tests/): unit (no sockets), integration (real sockets, one
# process), system (real processes and signals), browser (Chromium), deploy (Helm,
# Prometheus). Exit status is pytest's, except that "no tests collected" (pytest's
# 5) counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
tiers=()
while [ $# -gt 0 ]; do
  case "$1" in
    unit|integration|system|browser|deploy) tiers+=("tests/$1"); shift ;;
    *) break ;;
  esac
done
ops/setup.sh test
needs_tools=1
if [ ${#tiers[@]} -gt 0 ]; then
  needs_tools=0
  for t in "${tiers[@]}"; do
    case "$t" in
      tests/browser|tests/deploy) needs_tools=1 ;;
      tests/system) ops/setup-netns.sh ;;  # the partition tests' iptables
    esac
  done
fi
if [ "$needs_tools" -eq 1 ]; then
  for tool in ops/setup-*.sh; do
    [ -e "$tool" ] && "$tool"
  done
fi
set +e
.venv/bin/python -m pytest "${tiers[@]}" "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "no tests were collected: that is a failure" >&2
  exit 1
fi
exit "$status"
