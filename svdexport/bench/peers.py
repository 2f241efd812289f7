"""Peers: other caching libraries, run as real library calls on the same transformer and schedule.

Each peer drives the family's pipeline denoising loop (the family's sampling rule and its transformer
call, wrapped in `cache_context("cond")` as the pipeline wraps it) with that library's cache switched on,
and switches it off afterwards. Nothing here decides what to cache: the libraries do. A family lists the
peers known to run on it (`Family.peer_libraries`; cache-dit's adapters and the hooks' block patterns are
per model).

Settings, against svdexport's plan (full if i < warmup or (i - warmup + 1) % interval == 0):
- diffusers-taylorseer: TaylorSeerCacheConfig(disable_cache_before_step=max(warmup, 1), cache_interval=interval,
  max_order=order, taylor_factors_dtype=model dtype). Its hook computes when i < warmup or
  (i - warmup - 1) % interval == 0: the same warmup and spacing, but the first refresh comes at step
  warmup + 1 where svdexport's comes at warmup + interval - 1, so the phases differ (the counts agree
  when interval divides steps - warmup). By default it forecasts attention outputs only (the MLPs run
  every step); lite=True is its "lite" mode (blocks skipped, the final proj_out forecast).
- diffusers-fbcache: FirstBlockCacheConfig(threshold); the library has no warmup or interval knob.
- diffusers-magcache: MagCacheConfig(threshold, max_skip_steps=interval - 1,
  retention_ratio=warmup / steps (its first `warmup` steps always run), num_inference_steps=steps,
  mag_ratios=R). R comes from the library's own calibration mode (calibrate=True, which skips nothing
  and prints the ratios): one generation on the same model, schedule and conditioning from other noise
  latents (CALIBRATION_SEED), before each measured run and outside its `seconds`.
- cachedit-dbcache(-taylorseer): cache-dit's registered adapter of the model (FLUX, HunyuanVideo, SD3)
  applied to the bare transformer (`cache_dit.enable_cache(transformer)` wraps it in its own placeholder
  pipeline), DBCacheConfig with
  Fn_compute_blocks=fn_blocks, Bn_compute_blocks=0, max_warmup_steps=warmup, num_inference_steps=steps.
  schedule="plan" (default) passes a plan as steps_computation_mask with the "static" policy: `plan` (a
  list of bools per step, e.g. an engine's calibrated plan) or else svdexport's uniform plan of warmup and
  interval, so exactly those steps run in full and every other step is served from DBCache's residual cache;
  schedule="dynamic" is DBCache's own residual-diff test (residual_diff_threshold=threshold) with
  max_continuous_cached_steps=interval - 1. The -taylorseer variant adds
  TaylorSeerCalibratorConfig(taylorseer_order=order).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from svdexport.cache.plan import StepPlan
from svdexport.errors import SvdExportError
from svdexport.models.family import LATENTS, Family, Sampling, Shapes

PEERS: tuple[str, ...] = ("diffusers-taylorseer", "diffusers-fbcache", "diffusers-magcache", "cachedit-dbcache",
                          "cachedit-dbcache-taylorseer")
# The library's default 0.05 never skips on the small bundled and test models, whose first-block
# residuals change a lot from step to step; 0.4 does. Pass a smaller threshold= for real FLUX weights.
FBCACHE_THRESHOLD = 0.4
CALIBRATION_SEED = 1234  # noise latents of MagCache's calibration run (not the measured run's)


@dataclass
class PeerResult:
    latents: torch.Tensor  # final packed latents [B, tokens, channels]
    seconds: float  # wall time of the sampling loop only (no cache set-up, no calibration)
    full_steps: int  # steps on which the last single-stream block's attention actually ran


# Per peer: the diffusers config class it needs (None: cache-dit) and the options run_peer accepts.
_SPECS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "diffusers-taylorseer": ("TaylorSeerCacheConfig", ("order", "lite")),
    "diffusers-fbcache": ("FirstBlockCacheConfig", ("threshold",)),
    "diffusers-magcache": ("MagCacheConfig", ("threshold",)),
    "cachedit-dbcache": (None, ("schedule", "threshold", "fn_blocks", "plan")),
    "cachedit-dbcache-taylorseer": (None, ("schedule", "threshold", "fn_blocks", "order", "plan")),
}


@dataclass
class PeerLoop:
    """The sampling loop a peer runs in."""

    family: Family  # its pipeline's transformer call
    sampling: Sampling  # scheduler, timesteps and the model's timestep convention
    shapes: Shapes  # of the samples (the timesteps may depend on them)
    steps: int


def available(name: str, family: Family | None = None, lite: bool = False) -> str | None:
    """None if peer `name` can run here (on `family`, when given; in TaylorSeer's lite mode with `lite`), else
    a one-line reason."""
    if name not in _SPECS:
        raise SvdExportError(f"unknown peer {name!r} (choose from {', '.join(PEERS)})")
    if family is not None and name not in family.peer_libraries:
        return f"not wired for {family.name} models"
    if family is not None and lite and f"{name} lite" in family.peer_refusals:
        return family.peer_refusals[f"{name} lite"]
    config_class = _SPECS[name][0]
    if config_class is None:
        return None if importlib.util.find_spec("cache_dit") else "cache-dit is not installed (pip install cache-dit)"
    import diffusers

    if not hasattr(diffusers, config_class):
        return f"diffusers {diffusers.__version__} has no {config_class} (upgrade diffusers)"
    return None


def taylorseer_plan(steps: int, warmup: int, interval: int) -> list[int]:
    """The steps diffusers' TaylorSeer hook computes (`_measure_should_compute`): i < warmup or
    (i - warmup - 1) % interval == 0, with warmup (`disable_cache_before_step`) at least 1 as `run_peer` sets it."""
    w = max(warmup, 1)
    return [i for i in range(steps) if i < w or (i - w - 1) % interval == 0]


def taylorseer_schedule(steps: int, budget: int, warmup: int) -> tuple[int, int]:
    """(disable_cache_before_step, cache_interval) whose TaylorSeer plan has `budget` full steps: the warmup
    nearest `warmup` that admits an exact count (ties: the longer warmup), with the shortest such interval,
    which spreads the refreshes most evenly; if no pair is exact, the nearest count."""
    def key(pair):
        w, iv = pair
        return abs(len(taylorseer_plan(steps, w, iv)) - budget), abs(w - warmup), -w, iv

    return min(((w, iv) for w in range(1, max(budget, 2)) for iv in range(1, steps + 1)), key=key)


# ------------------------------------------------------------------------------------------ sampling loop


def _sample(model, loop: PeerLoop, inputs: dict[str, torch.Tensor],
            latents: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """The pipeline's denoising loop (from `latents`, default the inputs' noise); (final latents, seconds)."""
    scheduler = loop.sampling.scheduler()
    timesteps = loop.sampling.set_timesteps(scheduler, loop.steps, loop.shapes)
    latents = inputs[LATENTS.name] if latents is None else latents
    start = time.perf_counter()
    with torch.inference_mode():
        for t in timesteps:
            call = loop.family.forward_kwargs({**inputs, LATENTS.name: latents},
                                              loop.sampling.model_timestep(t, latents))
            # As the pipeline: diffusers' stateful cache hooks keep their state per context name. (FluxPipeline
            # also records `_current_timestep` on itself; only PyramidAttentionBroadcast's callback reads it.)
            with model.cache_context("cond") if _has_cache_mixin(model) else contextlib.nullcontext():
                noise = model(**call)[0]
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
    return latents, time.perf_counter() - start


def _has_cache_mixin(model: torch.nn.Module) -> bool:
    from diffusers.models.cache_utils import CacheMixin

    return isinstance(model, CacheMixin)


@contextlib.contextmanager
def _cache_mixin(model: torch.nn.Module):
    """`model` with diffusers' CacheMixin (enable_cache, cache_context) for a while. diffusers registers the
    blocks of models whose class does not inherit it (SD3Transformer2DModel's JointTransformerBlock) with its
    cache hooks, which the mixin switches on; the model's class is put back afterwards."""
    from diffusers.models.cache_utils import CacheMixin

    own = type(model)
    if not isinstance(model, CacheMixin):
        model.__class__ = type(own.__name__, (own, CacheMixin), {"__module__": own.__module__})
    try:
        yield
    finally:
        model.__class__ = own


@contextlib.contextmanager
def _restored(model: torch.nn.Module):
    """Puts back every module's instance attributes and the contents (and order) of its dicts.

    A backstop behind the libraries' own disable calls, which leave traces: diffusers leaves hook
    registries and instance-level `forward`s; cache-dit leaves its patched transformer forward in place
    and, through its per-call mock.patch of the block lists, moves them to the end of `_modules`. The
    same model object is exported and run by other methods afterwards.
    """
    saved = []
    for m in model.modules():
        attrs = dict(m.__dict__)
        saved.append((m, attrs, {k: dict(v) for k, v in attrs.items() if isinstance(v, dict)}))
    try:
        yield
    finally:
        for m, attrs, contents in saved:
            for key in set(m.__dict__) - set(attrs):
                del m.__dict__[key]
            m.__dict__.update(attrs)
            for key, items in contents.items():
                now = attrs[key]  # compared by identity (values are tensors; configs are frozen dicts)
                if list(now) != list(items) or any(now[k] is not v for k, v in items.items()):
                    now.clear()
                    now.update(items)


@contextlib.contextmanager
def _quiet(prefix: str):
    """Raises the library's loggers to ERROR for a while: cache-dit logs its set-up to stdout at INFO."""
    loggers = [lg for n, lg in logging.root.manager.loggerDict.items()
               if n.startswith(prefix) and isinstance(lg, logging.Logger)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ------------------------------------------------------------------------------- enabling each library
# Each switches its library's cache on and returns the library call that switches it off.

Disable = Callable[[], None]


def _check_order(order: int) -> None:
    if order not in (1, 2):
        raise SvdExportError(f"order must be 1 or 2, got {order}")


def _taylorseer(model, steps, warmup, interval, calibrate, order: int = 1, lite: bool = False) -> Disable:
    from diffusers import TaylorSeerCacheConfig

    _check_order(order)
    # Factors kept in the model's dtype (the library defaults to bfloat16), as svdexport keeps its own.
    # Warmup at least 1: with 0 the hook would forecast step 0 from nothing (svdexport forces step 0 too).
    model.enable_cache(TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=max(warmup, 1),
                                             max_order=order, taylor_factors_dtype=model.dtype,
                                             use_lite_mode=lite))
    return model.disable_cache


def _fbcache(model, steps, warmup, interval, calibrate, threshold: float = FBCACHE_THRESHOLD) -> Disable:
    from diffusers import FirstBlockCacheConfig

    model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    return model.disable_cache


def _magcache(model, steps, warmup, interval, calibrate, threshold: float = 0.06) -> Disable:
    from diffusers import MagCacheConfig

    # The library's calibration prints the ratios for the user to copy into `mag_ratios`; we read the print.
    model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            calibrate()
    finally:
        model.disable_cache()
    lists = [s for s in printed.getvalue().splitlines() if s.startswith("[") and s.endswith("]")]
    if not lists:
        raise SvdExportError("MagCache's calibration printed no magnitude ratios")
    model.enable_cache(MagCacheConfig(threshold=threshold, max_skip_steps=max(interval - 1, 0),
                                      retention_ratio=warmup / steps, num_inference_steps=steps,
                                      mag_ratios=ast.literal_eval(lists[-1])))
    return model.disable_cache


def _cachedit_target(model, pipeline: str | None):
    """What cache-dit caches: the bare transformer where cache-dit registers an adapter under its class name
    (FLUX, HunyuanVideo); else the adapter registered under the family's pipeline name (SD3's is
    "StableDiffusion3"), made as cache-dit makes its transformer-only ones (over a FakeDiffusionPipeline)."""
    import cache_dit
    from cache_dit.caching import FakeDiffusionPipeline

    registry = cache_dit.BlockAdapterRegister
    if registry.is_supported(model) or pipeline is None:
        return model
    made = [make for name, make in registry._adapters.items() if pipeline.startswith(name)]
    return made[0](FakeDiffusionPipeline(model)) if made else model


def _cachedit(model, steps, warmup, interval, calibrate, schedule: str = "plan", threshold: float = 0.08,
              fn_blocks: int = 1, order: int | None = None, plan: list[bool] | None = None,
              pipeline: str | None = None) -> Disable:
    import cache_dit

    if schedule not in ("plan", "dynamic"):
        raise SvdExportError(f"schedule must be 'plan' or 'dynamic', got {schedule!r}")
    # Bn_compute_blocks=0: a cached step runs only the first fn_blocks blocks, never the last one.
    config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=fn_blocks, Bn_compute_blocks=0, max_warmup_steps=warmup, residual_diff_threshold=threshold,
        max_continuous_cached_steps=max(interval - 1, 0), num_inference_steps=steps, enable_separate_cfg=False)
    if schedule == "plan":
        mask = StepPlan.uniform(steps, warmup, interval).mask if plan is None else list(plan)
        if len(mask) != steps or not mask[0]:
            raise SvdExportError(f"plan must give {steps} steps, the first full; got {len(mask)}")
        config.update(steps_computation_mask=[int(f) for f in mask], steps_computation_policy="static")
    calibrator = None
    if order is not None:
        _check_order(order)
        calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=order)
    target = _cachedit_target(model, pipeline)
    with _quiet("cache_dit"):
        cache_dit.enable_cache(target, cache_config=config, calibrator_config=calibrator)

    def disable() -> None:
        with _quiet("cache_dit"):
            cache_dit.disable_cache(target)

    return disable


_ENABLE = {
    "diffusers-taylorseer": _taylorseer,
    "diffusers-fbcache": _fbcache,
    "diffusers-magcache": _magcache,
    "cachedit-dbcache": _cachedit,
    "cachedit-dbcache-taylorseer": lambda *args, order=1, **kw: _cachedit(*args, order=order, **kw),
}


def run_peer(name: str, model, loop: PeerLoop, inputs: dict[str, torch.Tensor], warmup: int, interval: int,
             **options) -> PeerResult:
    """One generation with peer `name`'s cache on `model`; the model is left as it was, also on errors."""
    steps = loop.steps
    reason = available(name, loop.family, lite=bool(options.get("lite")))
    if reason is not None:
        raise SvdExportError(reason)
    unknown = sorted(set(options) - set(_SPECS[name][1]))
    if unknown:
        raise SvdExportError(f"peer {name} has no option {', '.join(unknown)} (its options: "
                             f"{', '.join(_SPECS[name][1])})")
    if steps < 1 or warmup < 0 or interval < 1:
        raise SvdExportError(f"need steps >= 1, warmup >= 0, interval >= 1; got {steps}, {warmup}, {interval}")

    def calibrate() -> None:  # one generation from other noise, for a library that calibrates first
        x = inputs[LATENTS.name]
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(CALIBRATION_SEED))
        _sample(model, loop, inputs, noise.to(x.device, x.dtype))

    ran = [0]
    # Counted inside the last block's attention (Family.peer_probe): a hook on the block would fire also when
    # a cache hook short-circuits the block's forward, and diffusers' TaylorSeer forecasts the attention while
    # the rest of the block still runs.
    probe = loop.family.peer_probe(model)
    if name.startswith("cachedit") and loop.family.prompts is not None:
        options = {**options, "pipeline": loop.family.prompts.pipeline_class}
    with _restored(model), _cache_mixin(model):
        disable = _ENABLE[name](model, steps, warmup, interval, calibrate, **options)
        handle = probe.register_forward_hook(lambda *_: ran.__setitem__(0, ran[0] + 1))
        try:
            latents, seconds = _sample(model, loop, inputs)
        finally:
            handle.remove()
            disable()
    return PeerResult(latents, seconds, ran[0])
