"""The step scheduler: per step it picks the graph, calls it, updates the predictor and steps the sampler."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from tqdm import tqdm

from svdexport.cache.config import CacheConfig, step_plan
from svdexport.cache.predictors import make_predictor


class Graph(Protocol):
    """An eager module or a compiled engine: positional tensors in `input_names` order."""

    input_names: list[str]

    def __call__(self, *inputs: torch.Tensor): ...


@dataclass
class Generation:
    latents: torch.Tensor  # final packed latents [B, tokens, channels]
    full_steps: int  # steps that ran the full-compute graph
    cached_steps: int  # steps that ran the cached-step graph
    seconds: float  # wall time of the sampling loop


# Called after each full step with (step, coefficients, residuals); calibration listens here.
FullStepHook = Callable[[int, torch.Tensor, torch.Tensor], None]


class CachedSampler:
    """Drives a full-compute and a cached-step graph over a diffusers flow-match sampler.

    All cache state (predictor, last residuals) lives in `generate`'s locals, so every request starts
    clean whatever its number of steps.
    """

    def __init__(self, full: Graph, cached: Graph, bases: torch.Tensor, cache: CacheConfig, sampler,
                 set_timesteps: Callable[[object, int], torch.Tensor]):
        self.full, self.cached, self.bases, self.cache = full, cached, bases, cache
        self.sampler = sampler  # diffusers FlowMatchEulerDiscreteScheduler
        self.set_timesteps = set_timesteps  # family rule: (sampler, steps) -> timesteps, resets the sampler

    @torch.inference_mode()
    def generate(self, inputs: dict[str, torch.Tensor], steps: int, cache: CacheConfig | None = None,
                 progress: bool = False, on_full_step: FullStepHook | None = None) -> Generation:
        cache = cache or self.cache
        plan = step_plan(steps, cache.warmup, cache.interval)
        predictor = make_predictor(cache.predictor, cache.beta, cache.order)
        timesteps = self.set_timesteps(self.sampler, steps)
        state = {**inputs, "bases": self.bases}
        latents = inputs["hidden_states"]
        full_names, cached_names = self.full.input_names, self.cached.input_names
        start = time.perf_counter()
        for i, t in enumerate(tqdm(timesteps, desc="sampling", unit="step", disable=not progress, leave=False)):
            state["hidden_states"] = latents
            # As FluxPipeline: the timestep in the latents' dtype, divided by 1000 before the call.
            state["timestep"] = t.expand(latents.shape[0]).to(latents.dtype) / 1000
            if plan[i]:
                out, coeffs, residuals = self.full(*[state[n] for n in full_names])
                predictor.update(i, coeffs)
                state["residuals"] = residuals
                if on_full_step is not None:
                    on_full_step(i, coeffs, residuals)
            else:
                state["coeffs"] = predictor.predict(i)
                out = self.cached(*[state[n] for n in cached_names])
            latents = self.sampler.step(out, t, latents, return_dict=False)[0]
        seconds = time.perf_counter() - start
        full = sum(plan)
        return Generation(latents, full, steps - full, seconds)
