"""Engines inside diffusers pipelines: `apply(pipe, engine_dir)` swaps the pipeline's transformer for an
engine-backed stand-in, so `pipe(prompt, ...)` keeps its text encoders, VAE, scheduler and prompts and
runs the full-compute and cached-step engines with the engine's step plan. The family's `PromptEncoder`
turns the pipeline's transformer call into graph inputs (FluxPipeline and its img2img and inpainting
variants, which share the transformer call; HunyuanVideoPipeline; StableDiffusion3Pipeline). `run_prompts`
is `svdexport run --prompt`: the whole pipeline of the folder the engine was built from.

The stand-in knows the step from the pipeline's scheduler (`step_index`, None before the first step of a
call; `begin_index` where img2img starts partway through), so its cache state starts fresh at the first
step of every call, and the step plan covers the steps the call actually runs. True CFG
calls the transformer twice per step under `cache_context("cond")` / `("uncond")`: each context keeps
its own cache state; a pipeline that joins both in one call (SD3's: `PromptEncoder.batched_cfg`) has its
halves run as those two contexts when the engine serves half the call's rows. LoRAs loaded into the
pipeline, before or after `apply`, go into the engine's weights (pipeline_loras.py).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.models.modeling_utils import ModelMixin

from svdexport.errors import SvdExportError
from svdexport.models.family import LATENTS, TIMESTEP
from svdexport.models.lora import hollow, hollow_of
from svdexport.models.weights import from_pretrained
from svdexport.runtime.engine import Engine
from svdexport.runtime.engine import load as load_engine
from svdexport.runtime.pipeline_loras import PipelineLoras

UNSUPPORTED = ("controlnet_block_samples", "controlnet_single_block_samples")


class EngineTransformer(PipelineLoras, ModelMixin):
    """What the family's pipeline needs of its transformer (config, dtype, device, cache_context, forward),
    backed by a compiled engine; and what its LoRA methods need (PipelineLoras). A ModelMixin only because
    diffusers' pipeline LoRA methods skip components that are not.

    Inputs with a leading batch axis (the family's `batched`) are padded with their last row when
    the call has fewer samples than the engine's smallest batch (a static engine's only one; a batch range
    is not padded); every graph input is cast to the dtype the engine
    was built with (activations in its precision, FLUX's rotary table and guidance in float32,
    HunyuanVideo's text mask in int64), whatever dtype the pipeline passes.
    """

    def __init__(self, engine: Engine, pipe, hollowed: torch.nn.Module, **cache_overrides):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.engine = engine
        self.cache = engine.cache_config(**cache_overrides)
        self.config = FrozenDict(engine.config)
        self._pipe = weakref.ref(pipe)  # the pipeline owns this module; no reference cycle
        self._context = "cond"
        self._caches: dict[str, object] = {}  # context name -> StepCache of the running call
        self._memo: dict = {}  # what the family's call_inputs keeps between steps (FLUX: the rotary table)
        self._dtypes = {n: getattr(torch, d) for g in engine.manifest.graphs.values()
                        for n, d in zip(g.inputs, g.input_dtypes)}  # graph input -> its build dtype
        self._hold(hollowed)

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.dtype

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs):
        previous, self._context = self._context, name
        try:
            yield
        finally:
            self._context = previous

    def plan_of_last_call(self) -> list[bool]:
        """Which steps of the latest call ran the full graph."""
        cache = self._caches.get("cond")
        return cache.plan.mask if cache else []

    def _step(self) -> tuple[int, int]:
        """(index of the current step among the steps this call runs, how many it runs) from the pipeline's
        scheduler. img2img and inpainting (strength < 1) start partway through the schedule: the scheduler's
        `begin_index` marks the first step that runs, so warmup and interval count from there."""
        scheduler = self._pipe().scheduler
        begin = scheduler.begin_index or 0
        index = begin if scheduler.step_index is None else scheduler.step_index
        return index - begin, len(scheduler.timesteps) - begin

    def _fit_batch(self, inputs: dict[str, torch.Tensor]) -> int:
        """Pads the batch up to the engine's smallest (a static engine's only) batch; a ranged batch is not padded."""
        want, most = self.engine.range.min.batch, self.engine.range.max.batch
        got = inputs[LATENTS.name].shape[0]
        if got > most:
            unit = "videos" if self.engine.family.is_video else "images"
            raise SvdExportError(f"the pipeline asks for {got} {unit} per step (prompts x num_{unit}_per_prompt); "
                                 f"this engine {_serves(self.engine, 'batch')} (rebuild with "
                                 f"--{'max-' * (want != most)}batch {got})")
        for k in self.engine.family.batched:
            if k in inputs and got < want:
                x = inputs[k]
                inputs[k] = torch.cat([x, x[-1:].expand(want - got, *x.shape[1:])])
        return got

    def _contexts(self, inputs: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor]]]:
        """The call's rows by cache context. A family whose pipeline joins its uncond and cond rows in one call
        (`batched_cfg`: SD3) has them run as two passes, each with its own cache state, when the engine serves
        fewer rows than the call has; else the call is one pass in the pipeline's context."""
        got, batched = inputs[LATENTS.name].shape[0], self.engine.family.batched
        if not self.engine.family.prompts.batched_cfg or got <= self.engine.range.max.batch or got % 2:
            return [(self._context, inputs)]
        half = [{k: v[part] if k in batched else v for k, v in inputs.items()}
                for part in (slice(None, got // 2), slice(got // 2, None))]
        return [("uncond", half[0]), ("cond", half[1])]  # the pipeline's order: torch.cat([latents] * 2)

    def _run(self, i: int, steps: int, context: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Step i of `steps` on the cache state of `context` (fresh at step 0)."""
        engine = self.engine
        batch = self._fit_batch(inputs)
        inputs = {k: v.to(engine.device, self._dtypes.get(k, v.dtype)) for k, v in inputs.items()}
        engine.check_inputs(inputs)
        if i == 0:
            self._caches[context] = engine.step_cache(steps, self.cache)
        cache = self._caches.get(context)
        if cache is None or cache.plan.steps != steps:
            raise SvdExportError(f"step {i} of a call whose step 0 this engine did not see; call the pipeline again")
        return cache(i, inputs)[:batch]

    @torch.inference_mode()
    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, joint_attention_kwargs: dict | None = None,
                return_dict: bool = True, attention_kwargs: dict | None = None, **kwargs):
        # FluxPipeline passes joint_attention_kwargs, HunyuanVideoPipeline attention_kwargs.
        for name, given in (("joint_attention_kwargs", joint_attention_kwargs), ("attention_kwargs", attention_kwargs)):
            if given:
                raise SvdExportError(f"an engine takes no {name} (got {sorted(given)}: IP-Adapter is not an "
                                     "engine input; set LoRA scales with pipe.set_adapters(names, adapter_weights=...))")
        used = [k for k in UNSUPPORTED if kwargs.get(k) is not None]
        if used:
            raise SvdExportError(f"an engine takes no {used[0]} (ControlNet residuals are not engine inputs)")
        engine = self.engine
        i, steps = self._step()
        if i == 0:
            self.sync_loras()  # once per call (and context): adapters loaded, weighted or unloaded since the last
        inputs = engine.family.prompts.call_inputs(engine.config, {**kwargs, LATENTS.name: hidden_states,
                                                           TIMESTEP.name: timestep}, self._memo)
        text_len = inputs[engine.family.text_input].shape[1]
        lo, hi = engine.range.min.text_len, engine.range.max.text_len
        if not lo <= text_len <= hi:
            raise SvdExportError(f"the prompt embeddings have {text_len} tokens; this engine "
                                 f"{_serves(engine, 'text_len', '')}: call the pipeline with "
                                 f"max_sequence_length={engine.shapes.text_len}")
        out = torch.cat([self._run(i, steps, context, rows) for context, rows in self._contexts(inputs)])
        out = out.to(hidden_states.device, hidden_states.dtype)
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)


def _serves(engine: Engine, axis: str, name: str | None = None) -> str:
    """'was built for batch 2' (static axis) or 'serves batch 1..4' (ranged), for refusals."""
    lo, hi, name = getattr(engine.range.min, axis), getattr(engine.range.max, axis), axis if name is None else name
    return f"was built for {name} {lo}".replace("  ", " ") if lo == hi else f"serves {axis} {lo}..{hi}"


def apply(pipe, engine: Engine | str | Path, **cache_overrides):
    """Replaces `pipe.transformer` with the engine (an Engine or its folder) and returns the pipeline.
    LoRAs loaded into the pipeline, before `apply` or after it, are fused into the engine's weights at the
    next pipeline call (no rebuild; see pipeline_loras.py).

    `cache_overrides` (interval, warmup, predictor, beta, order) change the step plan or the forecast for
    this pipeline without rebuilding; interval=1 runs every step in full.
    """
    if not isinstance(engine, Engine):
        engine = load_engine(engine)
    if engine.family.prompts is None:
        raise SvdExportError(f"svdexport.apply drives pipelines of families with text encoders; {engine.family.name} "
                             "engines run with engine.generate(...) (svdexport run)")
    own = getattr(pipe, "transformer", None)
    if own is not None and hasattr(own, "config"):
        keys = ("in_channels", "num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim",
                "joint_attention_dim", "text_embed_dim", "pooled_projection_dim", "guidance_embeds")
        differ = [k for k in keys if k in own.config and own.config[k] != engine.config.get(k)]
        if differ:
            raise SvdExportError(f"the engine's model differs from the pipeline's transformer ({differ[0]}: "
                                 f"{engine.config.get(differ[0])} vs {own.config[differ[0]]})")
    pipe.transformer = EngineTransformer(engine, pipe, _hollow_of_pipeline(own, engine), **cache_overrides)
    return pipe


def _hollow_of_pipeline(own, engine: Engine) -> torch.nn.Module:
    """The pipeline's transformer made hollow, with the adapters loaded into it (its own base weights are taken
    to be the engine's: same config); built from the engine's config when the pipeline has none."""
    if isinstance(own, EngineTransformer):  # apply on a pipeline that runs an engine already
        return hollow(own.hollow)
    if isinstance(own, ModelMixin):
        return hollow(own)
    return hollow_of(engine.family.transformer_class(), engine.config, engine.dtype)


def pipeline_for(engine: Engine, **cache_overrides):
    """The diffusers pipeline of the folder the engine was built from (its text encoders, VAE and
    scheduler), with the engine as its transformer."""
    import diffusers

    fam = engine.family
    source = engine.manifest.model.weights.source
    have = engine.manifest.model.pipeline_parts
    missing = [p for p in fam.pipeline_parts if p not in have]
    if fam.prompts is None or missing:
        raise SvdExportError(f"--prompt needs a {fam.name} pipeline folder with text encoders and a VAE; the "
                             f"engine's weights {source} have no {missing[0] if missing else 'prompt encoder'}")
    try:
        pipe = from_pretrained(getattr(diffusers, fam.prompts.pipeline_class), source, engine.dtype, transformer=None)
    except Exception as e:
        raise SvdExportError(f"cannot load the pipeline at {source}: {str(e).splitlines()[0]}") from None
    pipe.set_progress_bar_config(desc="sampling", leave=False)
    return apply(pipe.to(engine.device), engine, **cache_overrides)


@dataclass
class PromptRun:
    """What `run_prompts` made: per prompt a PIL image, or a video's PIL frames (video families)."""

    samples: list
    plan: list[bool]  # which steps ran the full graph
    seconds: float  # wall time of the pipeline call: text encoders, engine, VAE


def run_prompts(engine: Engine, prompts: list[str], steps: int, seed: int, guidance_scale: float | None = None,
                shapes=None, **cache_overrides) -> PromptRun:
    """The family's whole pipeline from the engine's weights folder on `prompts` at `shapes` (default: the
    build shapes; `guidance_scale` None: the family's default, FLUX.1-dev 3.5, HunyuanVideo 6.0)."""
    most = engine.range.max.batch
    if len(prompts) > most:
        raise SvdExportError(f"{len(prompts)} prompts, but this engine {_serves(engine, 'batch')} "
                             f"(rebuild with --{'max-' * engine.range.ranged}batch {len(prompts)})")
    pipe = pipeline_for(engine, **cache_overrides)
    encoder = engine.family.prompts
    guidance = encoder.default_guidance if guidance_scale is None else guidance_scale
    start = time.perf_counter()
    samples = encoder.generate(pipe, list(prompts), shapes or engine.shapes, steps, guidance,
                               torch.Generator().manual_seed(seed))
    return PromptRun(list(samples), pipe.transformer.plan_of_last_call(), time.perf_counter() - start)
