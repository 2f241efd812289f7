#!/usr/bin/env bash
# Wheels the GPU image lacks, for scripts/gpu_check.sh on a lent machine that reaches no registry: run here,
# then carry .whl/ (ignored by git) with the call. The image (docs/gpu.md) has PyTorch, transformers,
# accelerate, safetensors, onnx, onnxscript and a CPU onnxruntime; svdexport needs diffusers on top (and
# diffusers needs importlib_metadata). onnxruntime-gpu and torch-tensorrt (with TensorRT's libraries) are
# hundreds of MB to GB, over what a call can carry (64 MiB): without a registry those backends are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
mkdir -p .whl
"$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "diffusers==0.42.1" "importlib_metadata==8.7.0" "zipp==3.23.0"
ls -la .whl
