# Sourced by the set-up scripts: makes .venv and installs svdexport into it.
# torch is pinned first to 2.13.0: on a CPU machine pip takes the CPU build that lies on disk, and the
# project's torch range (which 2.13.0 satisfies) then installs nothing more - no multi-GB CUDA wheel.
quiet_pip() {  # pip's status survives (pipefail); only this machine's find-links noise is filtered
  .venv/bin/python -m pip -q --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  quiet_pip install "torch==2.13.0"
fi
quiet_pip install -e ".[dev,onnx,bench,ray,quantize]"
