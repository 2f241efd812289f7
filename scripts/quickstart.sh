#!/usr/bin/env bash
# Creates .venv, installs svdexport, builds the bundled FLUX model into an AOTInductor engine with
# SVD-Cache, and generates one image with it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
.venv/bin/svdexport build --model flux --backend aoti --out engines/flux-aoti
.venv/bin/svdexport run engines/flux-aoti --steps 50 --seed 0 --out out/quickstart.png
