"""Where a FLUX.1-width full step's time goes (issue 27, item 3): eager bf16 under torch.profiler, by op kind
(matmuls, attention, elementwise/norm work that an engine fuses, copies), beside the bytes the step must stream
(its weights) and this core's memory bandwidth, measured in the same run.

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/experiments/flux1_step_profile.py [--size 256]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from svdexport import hardware
from svdexport.bench.roofline import count_flops
from svdexport.models import family

sys.path.insert(0, str(Path(__file__).parent))
from int8_flux1_step import graph_and_args  # noqa: E402

MATMUL = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_int_mm")
ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention")


def kind(name: str) -> str:
    if name in MATMUL:
        return "matmul"
    if name in ATTENTION or "attention" in name:
        return "attention"
    if name in ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone", "aten::cat",
                "aten::stack"):
        return "copies/casts"
    return "elementwise, norms, other"


def bandwidth(gb: float = 1.0) -> float:
    """Read+write bytes per second of one large copy (the best of 3)."""
    a = torch.empty(int(gb * 2**30) // 4, dtype=torch.float32).fill_(1.0)
    b = torch.empty_like(a)
    best = 1e9
    for _ in range(3):
        start = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - start)
    return 2 * a.numel() * 4 / best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=256)
    a = p.parse_args()
    shapes = family("flux").shapes({"height": a.size, "width": a.size, "text_len": 64})
    graph, args = graph_and_args(torch.bfloat16, shapes)
    flops = count_flops(graph, args)
    weights = sum(t.numel() * t.element_size() for t in graph.transformer.state_dict().values())
    print(f"{hardware.describe_cpu()}; threads {torch.get_num_threads()}; load {os.getloadavg()}")
    with torch.inference_mode():
        graph(*args)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            graph(*args)
            step = time.perf_counter() - start
    by = defaultdict(float)
    for e in prof.key_averages():
        if e.key.startswith("aten::") and e.self_cpu_time_total > 0:
            by[kind(e.key)] += e.self_cpu_time_total / 1e6
    peak = hardware.matmul_peak(torch.bfloat16, "cpu", hardware.flux_shapes(shapes.img_tokens + 64, 3072, "cpu"), 3)
    bw = bandwidth()
    total = sum(by.values())
    print(f"{a.size}x{a.size}: step {step * 1e3:.0f} ms (profiled), {flops / 1e9:.1f} GFLOP, weights {weights / 1e9:.2f} GB;"
          f" bf16 peak {peak.flops_per_s / 1e12:.3f} TFLOP/s, copy bandwidth {bw / 1e9:.1f} GB/s")
    print(f"compute floor {flops / peak.flops_per_s * 1e3:.0f} ms, weight-streaming floor {weights / (bw / 2) * 1e3:.0f} ms"
          f" (weights read once at the copy's read rate)")
    print("| op kind | self ms | share of aten time |")
    print("|---|---|---|")
    for k, v in sorted(by.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v * 1e3:.0f} | {v / total:.0%} |")
    rows = defaultdict(lambda: [0.0, 0, 0])  # by matmul rows: seconds, calls, weight bytes
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key == "aten::addmm" and e.input_shapes:
            m, (k, n) = e.input_shapes[1][0], e.input_shapes[2]
            r = rows["GEMV (rows = batch)" if m <= shapes.batch else f"{m} rows"]
            r[0] += e.self_cpu_time_total / 1e6
            r[1] += e.count
            r[2] += e.count * k * n * 2
    print("| addmm by rows | ms | calls | weight GB | GB/s |")
    print("|---|---|---|---|---|")
    for k, (sec, calls, nbytes) in rows.items():
        print(f"| {k} | {sec * 1e3:.0f} | {calls} | {nbytes / 1e9:.2f} | {nbytes / sec / 1e9:.1f} |")


if __name__ == "__main__":
    main()
