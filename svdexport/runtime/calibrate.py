"""Calibration: full-compute sampling on reference inputs, then the bases from the accumulated Gram."""

from __future__ import annotations

from typing import Callable

import torch
from tqdm import tqdm

from svdexport.cache.config import CacheConfig
from svdexport.cache.svd import Bases, GramAccumulator
from svdexport.runtime.scheduler import CachedSampler, Graph

# Seeds of the calibration inputs start here, away from the small seeds users pass to `run`.
CALIBRATION_SEED = 1_000_000


def calibrate(full: Graph, cached: Graph, sites: list[str], dim: int, sampler, set_timesteps,
              make_inputs: Callable[[int], dict[str, torch.Tensor]], tau: float, k_max: int,
              num_inputs: int, steps: int, progress: bool = True, model_timestep=None) -> Bases:
    """Bases for `sites` from `num_inputs` full-compute generations of `steps` steps.

    The full graph runs with all-zero bases, so its residual output is the site features themselves.
    """
    zero = torch.zeros(len(sites), dim, 1)
    every_step = CacheConfig(warmup=steps, interval=1)
    loop = CachedSampler(full, cached, zero, every_step, sampler, set_timesteps, model_timestep)
    acc = GramAccumulator(len(sites), dim)
    with tqdm(total=num_inputs * steps, desc="calibrating", unit="step", disable=not progress) as bar:
        for i in range(num_inputs):
            def on_full_step(step: int, coeffs: torch.Tensor, features: torch.Tensor) -> None:
                acc.add(features)
                bar.update()

            loop.generate(make_inputs(CALIBRATION_SEED + i), steps, on_full_step=on_full_step)
    return Bases.from_gram(acc, sites, tau, k_max, num_inputs)
