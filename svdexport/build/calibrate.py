"""Calibration: full-compute sampling on reference inputs, then the bases from the accumulated Gram."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from svdexport.cache.config import CacheConfig
from svdexport.cache.svd import Bases, GramAccumulator
from svdexport.models.family import Sampling, Shapes
from svdexport.runtime.scheduler import CachedSampler, Graph

# Seeds of the calibration inputs start here, away from the small seeds users pass to `run`.
CALIBRATION_SEED = 1_000_000


@dataclass
class CalibrationSettings:
    num_inputs: int  # reference generations
    steps: int  # sampling steps of each
    tau: float  # energy the principal subspace keeps
    k_max: int  # rank cap per site


def calibrate(full: Graph, cached: Graph, sampling: Sampling, shapes: Shapes, sites: list[str], dim: int,
              make_inputs: Callable[[int], dict[str, torch.Tensor]], settings: CalibrationSettings,
              progress: bool = True) -> Bases:
    """Bases for `sites` from `settings.num_inputs` full-compute generations of `settings.steps` steps.

    The full graph runs with all-zero bases, so its residual output is the site features themselves.
    """
    zero = torch.zeros(len(sites), dim, 1)
    steps = settings.steps
    every_step = CacheConfig(warmup=steps, interval=1)
    loop = CachedSampler(full, cached, zero, every_step, sampling, shapes)
    acc = GramAccumulator(len(sites), dim)
    with tqdm(total=settings.num_inputs * steps, desc="calibrating", unit="step", disable=not progress) as bar:
        for i in range(settings.num_inputs):
            def on_full_step(step: int, coeffs: torch.Tensor, features: torch.Tensor) -> None:
                acc.add(features)
                bar.update()

            loop.generate(make_inputs(CALIBRATION_SEED + i), steps, on_full_step=on_full_step)
    return Bases.from_gram(acc, sites, settings.tau, settings.k_max, settings.num_inputs)
