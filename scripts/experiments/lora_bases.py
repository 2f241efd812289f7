"""Do an engine's SVD bases need recalibrating for a LoRA? (docs/lora.md)

Builds nothing: per granularity it calibrates the bundled digits model's bases as `svdexport build` does
(8 inputs x 50 steps), then for each LoRA calibrates again with the LoRA fused (diffusers + PEFT, as
engine.load_lora fuses it), and compares, on held-out seeds, the PSNR of SVD-Cache generations with the LoRA
against the same LoRA's full-compute generations, once with the base model's bases and once with the
recalibrated ones, under the default forecast and under forecasts that lean on the bases more.

    python scripts/experiments/lora_bases.py LORA.safetensors [LORA2.safetensors ...]
    python scripts/experiments/lora_bases.py --fitted LORA.safetensors [...]

With --fitted, the default predictor svd-fitted on its calibrated plan of 9 full steps: the plan statistics
(and so the plan and the fitted weights) are recalibrated with the LoRA as well as the bases.
"""

import statistics
import sys

import torch

from svdexport.bench.metrics import psnr
from svdexport.builder.build import BuildOptions, prepare, run_calibration
from svdexport.builder.calibrate import CalibrationSettings, plan_statistics
from svdexport.cache import fitted as fit
from svdexport.cache.plan import StepPlan
from svdexport.cache.config import CacheConfig
from svdexport.models.family import Conditioning
from svdexport.models.lora import LoraFile, fuse
from svdexport.runtime import plans as run_plans
from svdexport.runtime.scheduler import CachedSampler

SEEDS = range(16)  # calibration uses seeds from 1_000_000: these are held out
FORECASTS = {"svd-taylor, gamma 1": {"predictor": "svd-taylor"}, "gamma 0": {"gamma": 0.0}, "gamma 0.5": {"gamma": 0.5},
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
        inputs = p.fam.example_inputs(p.info.config, p.shapes, s, conditioning=Conditioning(p.table, [s % 10] * p.shapes.batch))
        got, ref = loop.generate(inputs, 50).latents, exact.generate(inputs, 50).latents
        out.append(psnr(p.fam.unpack(got, p.shapes), p.fam.unpack(ref, p.shapes)))
    return statistics.mean(out)


def fitted_psnrs(p, opts, bases, stats, graphs, budget: int = 9) -> float:
    """svd-fitted with `stats`' plan of `budget` full steps and its weights, on the LoRA model's graphs."""
    full, cached = graphs
    cache = CacheConfig(predictor="svd-fitted", full_steps=budget).validate()
    sizes = run_plans.schedule_step_sizes(p.sampling, p.shapes, 50)
    plan = run_plans.search(stats, budget, cache, sizes).full_steps
    loop = CachedSampler(full, cached, bases.vectors, cache, p.sampling, p.shapes)
    out = []
    for s in SEEDS:
        inputs = p.fam.example_inputs(p.info.config, p.shapes, s, conditioning=Conditioning(p.table, [s % 10] * p.shapes.batch))
        got = loop.generate(inputs, 50, plan=StepPlan(plan, 50, forecast_weights=fit.forecast_weights(stats, plan, 50))).latents
        ref = loop.generate(inputs, 50, plan=StepPlan(list(range(50)), 50)).latents
        out.append(psnr(p.fam.unpack(got, p.shapes), p.fam.unpack(ref, p.shapes)))
    return statistics.mean(out)


def calibrated(p, opts):
    bases = run_calibration(p, opts, progress=False)
    settings = CalibrationSettings(opts.calib_samples, 50, opts.cache.tau, opts.cache.k_max)
    stats = plan_statistics(p.full, p.cached, p.sampling, p.shapes, bases.vectors, lambda seed: p.inputs(seed, opts),
                            settings, progress=False)
    return bases, stats


@torch.no_grad()
def main_fitted(loras: list[str]) -> None:
    opts = BuildOptions(cache=CacheConfig(), calib_samples=8)
    base = calibrated(prepare(opts), opts)
    for path in loras:
        p = prepare(opts)
        fuse(p.model, p.fam.lora_loader, [LoraFile.parse(path)])
        a = fitted_psnrs(p, opts, *base, (p.full, p.cached))
        b = fitted_psnrs(p, opts, *calibrated(p, opts), (p.full, p.cached))
        print(f"final {path}: svd-fitted, 9 of 50: base bases and statistics {a:.2f} dB, recalibrated {b:.2f} dB "
              f"({b - a:+.2f})", flush=True)


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
    main_fitted(sys.argv[2:]) if sys.argv[1:2] == ["--fitted"] else main(sys.argv[1:])
