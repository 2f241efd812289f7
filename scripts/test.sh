#!/usr/bin/env bash
# Creates .venv, installs svdexport with its test dependencies, runs a tier of the test suite.
#   scripts/test.sh              the default suite (pytest -m "not extended"): under 10 minutes on 2 cores
#   scripts/test.sh --fast       the inner-loop tier (pytest -m "not slow and not extended"): math, graphs, CLI errors
#   scripts/test.sh --extended   the costly end-to-end cases the default suite covers more cheaply (CI runs both)
#   scripts/test.sh --all        every test
# Other arguments go to pytest; a -m of their own replaces the tier's (e.g. scripts/test.sh -m latency).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
tier='not extended'
case "${1:-}" in
  --fast) tier='not slow and not extended'; shift ;;
  --extended) tier='extended'; shift ;;
  --all) tier=''; shift ;;
esac
if [ -n "$tier" ]; then
  exec .venv/bin/python -m pytest -q -m "$tier" "$@"
fi
exec .venv/bin/python -m pytest -q "$@"
