"""Does an AOTInductor package load on this GPU, and does the size of its weights matter? (docs/gpu.md)

The flux1-reduced aoti engine (about 2 GB of bf16 weights) segfaulted in aoti_load_package on an H200 with
torch 2.11+cu130. This probe packages a plain stack of Linear layers with SIZE GB of bf16 weights, loads it in a
child process (a segfault is a result, not the end of the probe) and prints one line per size.

    python scripts/experiments/aoti_cuda_probe.py 0.1 1.0 2.2
"""

import subprocess
import sys
import tempfile
import time

import torch

CHILD = """
import sys, torch
from torch._inductor import aoti_load_package
m = aoti_load_package(sys.argv[1])
x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
print(float(m(x).float().abs().mean()))
"""


def package(gb: float, folder: str) -> str:
    layers = max(1, round(gb * 2**30 / (4096 * 4096 * 2)))
    model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096, bias=False) for _ in range(layers)])
    model = model.to("cuda", torch.bfloat16).eval()
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    ep = torch.export.export(model, (x,))
    path = f"{folder}/probe-{gb}.pt2"
    torch._inductor.aoti_compile_and_package(ep, package_path=path)
    return path


def main() -> None:
    for gb in map(float, sys.argv[1:] or ["0.1", "2.2"]):
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            path = package(gb, folder)
            built = time.perf_counter() - start
            r = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True, timeout=120)
            result = "ok" if r.returncode == 0 else f"exit {r.returncode}: {(r.stderr.strip().splitlines() or [''])[-1]}"
            print(f"{gb} GB of bf16 weights: built in {built:.0f} s, load+run {result}", flush=True)


if __name__ == "__main__":
    main()
