"""The step scheduler: per step it picks the graph, calls it, updates the predictor and steps the sampler."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from tqdm import tqdm

from svdexport.cache.config import CacheConfig
from svdexport.cache.plan import StepPlan
from svdexport.cache.predictors import FITTED, ResidualForecast, make_predictor
from svdexport.errors import SvdExportError
from svdexport.models.family import BASES, COEFFS, LATENTS, RESIDUALS, TIMESTEP, Sampling, Shapes


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
    shapes: Shapes | None = None  # the request's shapes (those of the latents)


# Called after each full step with (step, coefficients, residuals); calibration listens here.
FullStepHook = Callable[[int, torch.Tensor, torch.Tensor], None]


class StepCache:
    """The cache state of one request: which graph each step runs, the predictor and the last residuals.

    `CachedSampler` drives it over its own scheduler; `runtime.pipeline.EngineTransformer` drives it from
    inside a diffusers pipeline, one transformer call per step.
    """

    def __init__(self, full: Graph, cached: Graph, bases: torch.Tensor, cache: CacheConfig, plan: StepPlan):
        self.full, self.cached = full, cached
        # A static list: which graph a step runs never depends on tensor values.
        self.plan, self.mask = plan, plan.mask
        fitted = plan.forecast_weights
        if cache.predictor in FITTED:  # the plan's fitted weights cover the residual too
            if fitted is None and not all(self.mask):
                raise SvdExportError(f"predictor {cache.predictor} needs the fitted weights of its plan "
                                     "(engine.plan(...).forecast_weights)")
            parts = [{i: tuple(torch.as_tensor(w[part], dtype=torch.float32)) for i, w in (fitted or {}).items()}
                     for part in (0, 1)]  # (principal, residual) weights per cached step
            self.predictor = make_predictor(cache.predictor, weights=parts[0])
            self.residual = make_predictor(cache.predictor, weights=parts[1])
        else:
            self.predictor = make_predictor(cache.predictor, cache.beta, cache.order)
            self.residual = ResidualForecast(cache.gamma) if cache.gamma > 0 else None  # None: reuse R as it is
        self.state: dict[str, torch.Tensor] = {BASES.name: bases}
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # (C, R) of the latest full step

    def __call__(self, i: int, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model output at step i; `inputs` holds the graphs' inputs other than the cache tensors."""
        self.state.update(inputs)
        if self.mask[i]:
            out, coeffs, residuals = self.full(*[self.state[n] for n in self.full.input_names])
            self.predictor.update(i, coeffs)
            if self.residual is not None:
                self.residual.update(i, residuals)
            self.state[RESIDUALS.name] = residuals
            self.last = coeffs, residuals
        else:
            self.state[COEFFS.name] = self.predictor.predict(i)
            if self.residual is not None:
                self.state[RESIDUALS.name] = self.residual.predict(i)
            out = self.cached(*[self.state[n] for n in self.cached.input_names])
        return out


class CachedSampler:
    """Drives a full-compute and a cached-step graph over a diffusers flow-match scheduler, with the family's
    sampling rule for samples of `shapes`.

    All cache state lives in a fresh StepCache per `generate`, so every request starts clean whatever
    its number of steps.
    """

    def __init__(self, full: Graph, cached: Graph, bases: torch.Tensor, cache: CacheConfig, sampling: Sampling,
                 shapes: Shapes):
        self.full, self.cached, self.bases, self.cache = full, cached, bases, cache
        self.sampling, self.shapes = sampling, shapes
        self.scheduler = sampling.scheduler()

    @torch.inference_mode()
    def generate(self, inputs: dict[str, torch.Tensor], steps: int, cache: CacheConfig | None = None,
                 progress: bool = False, on_full_step: FullStepHook | None = None,
                 plan: StepPlan | None = None, shapes: Shapes | None = None) -> Generation:
        """One request; `plan` (which steps run in full, with a fitted predictor's forecast weights) defaults
        to the uniform plan of `cache`. `shapes` are the request's (default: the sampler's): the family's
        resolution-dependent shift follows them."""
        cache = cache or self.cache
        plan = plan or StepPlan.uniform(steps, cache.warmup, cache.interval)
        if plan.steps != steps:
            raise ValueError(f"a plan of {plan.steps} steps for a request of {steps}")
        step = StepCache(self.full, self.cached, self.bases, cache, plan)
        shapes = shapes or self.shapes
        timesteps = self.sampling.set_timesteps(self.scheduler, steps, shapes)
        latents = inputs[LATENTS.name]
        step.state.update(inputs)
        start = time.perf_counter()
        for i, t in enumerate(tqdm(timesteps, desc="sampling", unit="step", disable=not progress, leave=False)):
            out = step(i, {LATENTS.name: latents, TIMESTEP.name: self.sampling.model_timestep(t, latents)})
            if on_full_step is not None and step.mask[i]:
                on_full_step(i, *step.last)
            latents = self.scheduler.step(out, t, latents, return_dict=False)[0]
        seconds = time.perf_counter() - start
        full = len(plan.full_steps)
        return Generation(latents, full, steps - full, seconds, shapes)
