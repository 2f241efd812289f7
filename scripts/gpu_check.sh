#!/usr/bin/env bash
# The prepared check for a lent GPU (docs/gpu.md): sets up what the bare machine lacks, then runs
# scripts/gpu_check.py, which builds bundled:flux1-reduced at 1024x1024 in bf16 with aoti, inductor, tensorrt and onnx,
# checks each against eager bf16 and prints one markdown table. Meant to finish within 8 minutes on one H100.
#
#   scripts/gpu_check.sh [--out DIR] [--backends aoti,onnx] [--budget-s 480] [--json FILE]
#   scripts/gpu_check.sh --tiny      the same logic on this CPU (bundled digits, aoti and onnx), under a minute
#   scripts/gpu_check.sh --full-depth [--json FILE]   only the full-depth row (scripts/gpu_full_depth.py):
#       FLUX.1-dev's config with random weights drawn on the GPU, its SVD-Cache engine against eager bf16 and
#       torch.compile, 50 steps at 1024x1024; its own 10-minute call (540 s budget, set-up included), run
#       before or after the call above. --full-depth --tiny: its logic on this CPU with a tiny model.
#
# Packages: the GPU image's python3 (itself a venv at /opt/torch/.venv) holds PyTorch with CUDA; what it lacks
# (diffusers; optionally onnxruntime-gpu and torch-tensorrt) is installed into that same environment, with
# torch pinned to the image's version so that pip never replaces it. (A venv made from that python would not
# see the image's packages, torch included: --system-site-packages means the base interpreter's.) The lent
# machine is discarded after the lease, so nothing outlives the check. Wheels come from .whl/ (made here by
# scripts/gpu_wheels.sh and carried) or from PyPI where the machine reaches it; a backend whose package is
# still missing is skipped by gpu_check.py with the reason.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ " $* " == *" --tiny "* ]]; then
    exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
fi

start=$(date +%s)
py=${PYTHON:-python3}
torch_version=$("$py" -c 'import torch; print(torch.__version__.split("+")[0])') || {
    echo "svdexport: error: $py has no PyTorch" >&2; exit 2; }
"$py" -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null || {  # before installing anything
    echo "svdexport: error: no CUDA GPU is visible to $py (use --tiny to run this check on a CPU)" >&2; exit 2; }
echo "torch==$torch_version" > /tmp/svdexport-constraints.txt
sources=()
if compgen -G ".whl/*.whl" > /dev/null; then
    sources+=(--find-links .whl)
fi
if ! timeout 6 "$py" -c 'import urllib.request; urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=5)' \
        2>/dev/null; then
    sources+=(--no-index)  # no registry reachable: the carried wheels only
    echo "PyPI is not reachable: installing from .whl/ only"
fi

install() {  # install WHAT... unless CHECK (python code) passes; a failure leaves the backend skipped
    local check=$1; shift
    "$py" -c "$check" 2>/dev/null && return 0
    timeout 240 "$py" -m pip install -q --disable-pip-version-check -c /tmp/svdexport-constraints.txt \
        "${sources[@]}" "$@" 2>&1 | tail -2
    "$py" -c "$check" 2>/dev/null || echo "not installed: $* (its backend is skipped)"
}

install 'import diffusers' 'diffusers>=0.35,<0.43'
if [[ " $* " != *" --full-depth "* ]]; then  # the full-depth row needs diffusers only (aoti, inductor)
    install 'import onnxruntime as o; assert "CUDAExecutionProvider" in o.get_available_providers()' \
        onnxruntime-gpu 'onnxscript>=0.2' 'onnx-ir>=0.1' 'onnx>=1.17'
    install 'import torch_tensorrt' "torch-tensorrt==${torch_version%.*}.*"
    install 'import torchao' --no-deps 'torchao>=0.18'  # the aoti+fp8 row (build --quantize fp8)
fi
"$py" -c 'import diffusers' 2>/dev/null || {
    echo "svdexport: error: diffusers is missing and could not be installed (carry it: scripts/gpu_wheels.sh)" >&2
    exit 2; }
echo "set-up: $(( $(date +%s) - start )) s"

total=480  # 8 minutes for the whole script, set-up included
[[ " $* " == *" --full-depth "* ]] && total=540  # the full-depth row: 9 minutes, in a 10-minute call of its own
budget=$(( total - ($(date +%s) - start) ))
(( budget < 60 )) && budget=60
exec "$py" scripts/gpu_check.py --budget-s "$budget" "$@"
