"""The int8 matmul peak of oneDNN's qlinear (the kernel PT2E int8 engines call: u8 activations, s8 weights
prepacked, f32 or bf16 out), beside svdexport.hardware.matmul_peak's bf16 peak, at FLUX.1 width.

    python scripts/experiments/int8_peak.py [--threads 1]
"""
from __future__ import annotations

import time

import torch

from svdexport import hardware


@torch.inference_mode()
def int8_peak(shapes: list[tuple[int, int, int]], repeats: int = 5,
              out_dtype: torch.dtype = torch.bfloat16) -> hardware.Peak:
    """oneDNN qlinear (per-tensor u8 activations, per-channel s8 weights, prepacked) at each (M, K, N)."""
    g = torch.Generator().manual_seed(0)
    best = hardware.Peak(0.0, shapes[0], "int8", "cpu")
    for m, k, n in shapes:
        qx = torch.randint(0, 255, (m, k), dtype=torch.uint8, generator=g)
        w = torch.randint(-127, 127, (n, k), dtype=torch.int8, generator=g)
        packed = torch.ops.onednn.qlinear_prepack(w, [m, k])
        ws, wz = torch.full((n,), 0.01), torch.zeros(n, dtype=torch.int32)
        xs, xz = torch.tensor(0.02), torch.tensor(128, dtype=torch.int32)

        def call():
            return torch.ops.onednn.qlinear_pointwise.tensor(qx, xs, xz, packed, ws, wz, None, 1.0, 0, out_dtype,
                                                             "none", [], "")
        call()
        seconds = min(_timed(call) for _ in range(repeats))
        rate = 2 * m * k * n / seconds
        best.by_shape[f"{m}x{k}x{n}"] = rate
        if rate > best.flops_per_s:
            best = hardware.Peak(rate, (m, k, n), "int8", "cpu", best.by_shape)
    return best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    import argparse
    import os

    a = argparse.ArgumentParser()
    a.add_argument("--threads", type=int, default=1)
    args = a.parse_args()
    torch.set_num_threads(args.threads)
    shapes = hardware.flux_shapes(320, 3072, "cpu")
    print(hardware.describe_cpu(), "threads", args.threads, "load", os.getloadavg())
    for _ in range(2):
        b = hardware.matmul_peak(torch.bfloat16, "cpu", shapes, 5)
        i = int8_peak(shapes)
        print("bf16", {k: round(v / 1e12, 3) for k, v in b.by_shape.items()})
        print("int8", {k: round(v / 1e12, 3) for k, v in i.by_shape.items()})
