"""Do an engine's SVD bases need recalibrating for a LoRA? (docs/lora.md)

Builds nothing: per granularity it calibrates the bundled digits model's bases as `svdexport build` does
(8 inputs x 50 steps), then for each LoRA calibrates again with the LoRA fused (diffusers + PEFT, as
engine.load_lora fuses it), and compares, on held-out seeds, the PSNR of SVD-Cache generations with the LoRA
against the same LoRA's full-compute generations, once with the base model's bases and once with the
recalibrated ones, under the default forecast and under forecasts that lean on the bases more.

    python scripts/experiments/lora_bases.py LORA.safetensors [LORA2.safetensors ...]
"""

import statistics
import sys

import torch

from svdexport.bench.metrics import psnr
from svdexport.build.builder import BuildOptions, prepare, run_calibration
from svdexport.cache.config import CacheConfig
from svdexport.models.lora import LoraFile, fuse
from svdexport.runtime.scheduler import CachedSampler

SEEDS = range(16)  # calibration uses seeds from 1_000_000: these are held out
FORECASTS = {"default (svd-taylor, gamma 1)": {}, "gamma 0": {"gamma": 0.0}, "gamma 0.5": {"gamma": 0.5},
             "ema": {"predictor": "ema"}}


def psnrs(p, opts, bases, lora_model_graphs, **forecast) -> float:
    full, cached = lora_model_graphs
    cache = CacheConfig(**{**opts.cache.to_dict(), **forecast}).validate()
    loop = CachedSampler(full, cached, bases.vectors, cache, p.sampling, p.shapes)
    exact = CachedSampler(full, cached, bases.vectors, CacheConfig(**{**cache.to_dict(), "plan": "uniform",
                                                                     "warmup": 50, "interval": 1}).validate(),
                          p.sampling, p.shapes)
    out = []
    for s in SEEDS:
        inputs = p.fam.example_inputs(p.info.config, p.shapes, s, table=p.table, labels=[s % 10] * p.shapes.batch)
        got, ref = loop.generate(inputs, 50).latents, exact.generate(inputs, 50).latents
        out.append(psnr(p.fam.unpack(got, p.shapes), p.fam.unpack(ref, p.shapes)))
    return statistics.mean(out)


@torch.no_grad()
def main(loras: list[str]) -> None:
    for granularity in ("final", "block"):
        opts = BuildOptions(cache=CacheConfig(granularity=granularity, plan="uniform"), calib_samples=8)
        p = prepare(opts)
        base_bases = run_calibration(p, opts, progress=False)
        for path in loras:
            p = prepare(opts)  # a fresh base model; its graphs share the weights fused below
            fuse(p.model, p.fam.lora_loader, [LoraFile.parse(path)])
            lora_bases = run_calibration(p, opts, progress=False)
            for name, forecast in FORECASTS.items():
                a = psnrs(p, opts, base_bases, (p.full, p.cached), **forecast)
                b = psnrs(p, opts, lora_bases, (p.full, p.cached), **forecast)
                print(f"{granularity:5s} {path}: {name}: base bases {a:.2f} dB, recalibrated {b:.2f} dB "
                      f"({b - a:+.2f})", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
