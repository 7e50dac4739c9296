#!/usr/bin/env bash
# One command: set everything up and run the whole test suite.
# Extra arguments go to pytest. Exit status is pytest's, except that "no tests
# collected" (pytest's 5) counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ops/setup.sh test
for tool in ops/setup-*.sh; do
  [ -e "$tool" ] && "$tool"
done
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "no tests were collected: that is a failure" >&2
  exit 1
fi
exit "$status"
