#!/usr/bin/env bash
# Creates .venv, installs svdexport, builds the bundled FLUX engine and generates one image with it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
.venv/bin/svdexport build --model flux --backend eager --out engines/flux-eager
.venv/bin/svdexport run engines/flux-eager --steps 50 --seed 0 --out out/quickstart.png
