"""What bf16 costs: SVD-Cache and full compute in bf16 (cache math in float32 or in bf16) against float32.

    python scripts/measure_precision.py [--weights bundled:digits] [--samples 16] [--steps 50]

Builds two eager engines of the same weights (float32 and bf16, same calibration settings), runs the same
seeds and classes through every variant and prints the mean image PSNR of each against float32 full compute
(the reference compare uses) and against full compute in the variant's own dtype. The cache-math variants
set `svdexport.models.mmdit.CACHE_DTYPE` and `RESIDUAL_DTYPE`, which the graphs read at call time (eager
graphs only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import svdexport  # noqa: E402
from svdexport.bench.metrics import psnr  # noqa: E402
from svdexport.builder.build import BuildOptions, build  # noqa: E402
from svdexport.cache.config import CacheConfig  # noqa: E402
from svdexport.models import mmdit  # noqa: E402


def engines(weights: str, root: Path, calib_samples: int, extra: dict) -> dict:
    out = {}
    for dtype in ("fp32", "bf16"):
        opts = BuildOptions(weights=weights, dtype=dtype, calib_samples=calib_samples, **extra)
        build(opts, root / dtype, progress=False)
        out[dtype] = svdexport.load(root / dtype)
    return out


def arguments(description: str) -> argparse.ArgumentParser:
    """The options the measurement scripts share (scripts/measure_shapes.py uses them too)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--weights", default="bundled:digits")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--first-seed", type=int, default=0, help="samples use seeds first-seed, first-seed + 1, ...")
    p.add_argument("--granularity", default="final", help="final | block")
    return p


def main() -> None:
    a = arguments(__doc__.splitlines()[0]).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        e = engines(a.weights, Path(tmp), a.calib_samples, {"cache": CacheConfig(granularity=a.granularity)})
        fam, shapes = e["fp32"].family, e["fp32"].shapes
        labels = e["fp32"].labels

        def images(engine, x, interval, cache_dtype=torch.float32, residual_dtype=None):
            mmdit.CACHE_DTYPE, mmdit.RESIDUAL_DTYPE = cache_dtype, residual_dtype
            try:
                g = engine.generate(x, steps=a.steps, **({} if interval is None else {"interval": interval}))
            finally:
                mmdit.CACHE_DTYPE, mmdit.RESIDUAL_DTYPE = torch.float32, None
            return fam.unpack(g.latents, shapes)[0]

        rows: dict[str, list[tuple[float, float]]] = {}
        for seed in range(a.first_seed, a.first_seed + a.samples):
            lab = None if labels is None else [seed % len(labels)] * shapes.batch
            xs = {d: e[d].example_inputs(seed, lab) for d in e}
            ref32 = images(e["fp32"], xs["fp32"], 1)
            ref16 = images(e["bf16"], xs["bf16"], 1)
            variants = {
                "fp32 SVD-Cache": (images(e["fp32"], xs["fp32"], None), ref32),
                "bf16 full compute": (ref16, ref32),
                "bf16 SVD-Cache, cache math fp32, R bf16 (default)": (images(e["bf16"], xs["bf16"], None), ref16),
                "bf16 SVD-Cache, cache math fp32, R fp32": (images(e["bf16"], xs["bf16"], None, torch.float32,
                                                                  torch.float32), ref16),
                "bf16 SVD-Cache, cache math bf16": (images(e["bf16"], xs["bf16"], None, torch.bfloat16), ref16),
            }
            for name, (img, own) in variants.items():
                rows.setdefault(name, []).append((min(psnr(img, ref32), 99.0), min(psnr(img, own), 99.0)))
        print(f"{a.weights}, {a.granularity}, seeds {a.first_seed}..{a.first_seed + a.samples - 1}, {a.steps} steps, "
              f"interval {e['fp32'].cache.interval}, "
              f"threads {torch.get_num_threads()}")
        print("| variant | PSNR vs fp32 full compute (dB) | PSNR vs own-dtype full compute (dB) |")
        print("|---|---|---|")
        for name, vals in rows.items():
            print(f"| {name} | {statistics.mean(v[0] for v in vals):.2f} | {statistics.mean(v[1] for v in vals):.2f} |")


if __name__ == "__main__":
    main()
