"""What bf16 costs HunyuanVideo's bundled digits model on this CPU: full-compute latency of the eager model
in bf16 against fp32, and the PSNR of bf16 against fp32 (full compute, and SVD-Cache at the default budget).

    python scripts/measure_video_precision.py [--samples 16] [--first-seed 0] [--steps 50]

Builds two eager engines of the same weights with the default settings (fp32 and bf16, each calibrated in its
own dtype), runs the same seeds and clips through both, fp32 and bf16 alternating first per sample, and prints
the median time of a 50-step full-compute generation per dtype (and per step), the median of the per-sample
bf16 / fp32 time ratios, and the mean and worst PSNR of each variant against fp32 full compute. Both dtypes
get the same inputs: the bf16 engine's, upcast for fp32 (as `compare` sets a bf16 engine against fp32). Seeds
0-15 by default: not the held-out set (5000-5031), on which nothing is chosen.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import svdexport  # noqa: E402
from svdexport import hardware  # noqa: E402
from svdexport.bench.metrics import psnr  # noqa: E402
from svdexport.builder.build import BuildOptions, build  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="hunyuanvideo")
    p.add_argument("--weights", default="bundled:digits")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    a = p.parse_args()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        e = {}
        for dtype in ("fp32", "bf16"):
            build(BuildOptions(model=a.model, weights=a.weights, dtype=dtype), Path(tmp) / dtype, progress=False)
            e[dtype] = svdexport.load(Path(tmp) / dtype)
        fam, shapes, labels = e["fp32"].family, e["fp32"].shapes, e["fp32"].labels
        budget = len(e["fp32"].plan(a.steps).full_steps)

        def run(dtype: str, x: dict, full: bool):
            x = x if dtype == "bf16" else {k: v.float() if v.is_floating_point() else v for k, v in x.items()}
            g = e[dtype].generate(x, steps=a.steps, **({"interval": 1} if full else {}))
            return fam.unpack(g.latents, shapes)[0].float(), g.seconds

        seeds = range(a.first_seed, a.first_seed + a.samples)
        first = e["bf16"].example_inputs(a.first_seed, None if labels is None else [0] * shapes.batch)
        for dtype in e:  # warm-up: one-time costs stay out of the timings
            run(dtype, first, True)
        seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
        quality: dict[str, list[float]] = {}
        for n, seed in enumerate(seeds):
            x = e["bf16"].example_inputs(seed, None if labels is None else [seed % len(labels)] * shapes.batch)
            out = {}
            for dtype in (("fp32", "bf16") if n % 2 == 0 else ("bf16", "fp32")):
                out[dtype], t = run(dtype, x, True)
                seconds[dtype].append(t)
            ref = out["fp32"]
            cached = {d: run(d, x, False)[0] for d in e}
            for name, img in (("bf16 full compute", out["bf16"]),
                              (f"fp32 SVD-Cache, {budget} of {a.steps} full steps", cached["fp32"]),
                              (f"bf16 SVD-Cache, {budget} of {a.steps} full steps", cached["bf16"])):
                quality.setdefault(name, []).append(min(psnr(img, ref), 99.0))
    ratios = [b / f for b, f in zip(seconds["bf16"], seconds["fp32"])]
    print(f"{a.model} {a.weights}, seeds {seeds[0]}-{seeds[-1]}, {a.steps} steps, shapes {shapes.to_dict()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; CPU: {hardware.cpu_bf16()[1]}; "
          f"load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print(f"| eager full compute, {a.steps} steps | fp32 | bf16 | bf16 / fp32 (median of per-sample ratios) |")
    print("|---|---|---|---|")
    med = {d: statistics.median(v) for d, v in seconds.items()}
    print(f"| median s per generation | {med['fp32']:.3f} | {med['bf16']:.3f} | {statistics.median(ratios):.2f} |")
    print(f"| median ms per step | {med['fp32'] / a.steps * 1e3:.1f} | {med['bf16'] / a.steps * 1e3:.1f} | - |")
    print("\n| against fp32 full compute | PSNR mean dB | worst dB |\n|---|---|---|")
    for name, vals in quality.items():
        print(f"| {name} | {statistics.mean(vals):.2f} | {min(vals):.2f} |")


if __name__ == "__main__":
    main()
