#!/usr/bin/env bash
# Creates .venv, installs svdexport with its test dependencies, runs the default (full) test suite.
#   scripts/test.sh            the full suite, as CI runs it
#   scripts/test.sh --fast     the inner-loop tier (pytest -m "not slow"): math, graphs, scheduler, CLI errors
# Other arguments go to pytest (e.g. scripts/test.sh -m latency).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
if [ "${1:-}" = "--fast" ]; then
  shift
  exec .venv/bin/python -m pytest -q -m "not slow" "$@"
fi
exec .venv/bin/python -m pytest -q "$@"
