#!/usr/bin/env bash
# Creates .venv, installs svdexport with its test dependencies, runs the default test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -m latency).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
exec .venv/bin/python -m pytest -q "$@"
