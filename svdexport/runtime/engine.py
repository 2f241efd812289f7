"""A loaded engine: verified manifest, the two graphs, the bases and the step scheduler."""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from pathlib import Path

import torch

from svdexport.cache.config import CacheConfig
from svdexport.cache.plan_stats import load_stats
from svdexport.cache.svd import Bases
from svdexport.errors import SvdExportError
from svdexport.export import backend
from svdexport.export.boundary import retyped
from svdexport.models import family
from svdexport.models.family import Shapes
from svdexport.models.lora import LoraFile, fuse, hollow_of
from svdexport.models.weights import load_table
from svdexport.runtime import manifest as manifest_io
from svdexport.runtime import fields, static
from svdexport.runtime.base import base_weights, eager_graphs
from svdexport.runtime.bound import open_bound
from svdexport.runtime.latent_shapes import MadeLatents, shapes_for_preview
from svdexport.runtime.lora import WeightSwap, graph_weights, to_push
from svdexport.runtime.manifest import BASES_FILE, PLAN_STATS_FILE, ConditioningKind, EngineKind, Manifest
from svdexport.runtime.plans import RequestPlan, plan_for, schedule_weights
from svdexport.runtime.scheduler import CachedSampler, Generation, StepCache

# Run-time overrides of the engine's cache settings: the plan and the forecast, never the bases.
OVERRIDES = {"interval", "warmup", "predictor", "beta", "order", "plan", "full_steps", "gamma"}


class Engine:
    """Runs SVD-Cache generation over the engine's graphs: at the shapes it was built for (a static engine) or
    at any shapes in its range (a ranged one)."""

    def __init__(self, folder: Path, manifest: Manifest, full, cached, bases: Bases):
        self.folder, self.manifest, self.bases = folder, manifest, bases
        self.family = family(manifest.model.family)
        self.config = manifest.model.config
        self.shapes = self.family.shapes(manifest.shapes.build)  # a ranged engine's optimum
        self.range = manifest.shapes.range(self.family)
        self._input_shapes: dict[tuple, dict[str, list[int]]] = {}
        self.dtype = getattr(torch, manifest.dtype)
        self.device = torch.device(manifest.device)
        self.cache = manifest.cache
        self.steps = manifest.steps  # the model's default steps per sample (dev 50, schnell 4)
        self.full, self.cached = full, cached
        cond = manifest.model.conditioning
        self.conditioning = cond.kind
        self.labels = cond.labels  # class names when the model is class-conditioned, else None
        self.table = load_table(manifest.path(folder, cond.file)) if cond.kind is ConditioningKind.CLASS_TABLE else None
        if self.table is not None:
            fields.check_table(manifest, self.table, folder / cond.file)
        self.sampling = self.family.sampling(manifest.sampler)
        self.sampler = CachedSampler(full, cached, bases.vectors.to(self.device), self.cache, self.sampling,
                                     self.shapes)
        # Through the manifest's resolver, as every file an engine opens: listed, hashed, inside the folder.
        sets = load_stats(manifest.path(folder, PLAN_STATS_FILE)) if PLAN_STATS_FILE in manifest.files else []
        self.plan_stats = sets[0] if sets else None  # at the build's step count
        self._stats_by_steps = {st.steps: st for st in sets}  # and at build --plan-steps' counts
        self._weights: dict[int, object] = {}
        self.loras: list[LoraFile] = []  # fused into the graphs' weights now, in load order
        self._swap = WeightSwap()  # the weights they changed and the base values under them
        self.weights_from = None  # who pushed the weights now loaded: None (set_loras, or the build), or a pipeline
        self._made = MadeLatents()  # the request shapes of the latents `generate` returned (for `preview`)

    def request_shapes(self, batch: int | None = None, height: int | None = None, width: int | None = None,
                       text_len: int | None = None) -> Shapes:
        """The build shapes with the given axes replaced; refused in one line outside the engine's range."""
        return self.range.request(batch=batch, height=height, width=width, text_len=text_len)

    def example_inputs(self, seed: int = 0, labels: list[int] | None = None,
                       shapes: Shapes | None = None) -> dict[str, torch.Tensor]:
        """Seeded noise and conditioning (the classes `labels` for a class-conditioned model, else
        synthetic embeddings) with `shapes` (default: the build shapes) and the engine's dtype."""
        if labels is not None and self.table is None:
            raise SvdExportError("this engine's model is not class-conditioned; it takes no labels")
        inputs = self.family.example_inputs(self.config, shapes or self.shapes, seed, dtype=self.dtype,
                                            table=self.table, labels=labels)
        return {k: v.to(self.device) for k, v in inputs.items()}

    def input_shapes(self, shapes: Shapes) -> dict[str, list[int]]:
        """Every input's shape at `shapes` (from the family's own inputs at those shapes, memoised)."""
        key = tuple(shapes.to_dict().items())
        if key not in self._input_shapes:
            x = self.family.example_inputs(self.config, shapes, 0, dtype=self.dtype, table=self.table)
            self._input_shapes[key] = {k: list(v.shape) for k, v in x.items() if k in self.manifest.shapes.inputs}
        return self._input_shapes[key]

    def check_inputs(self, inputs: dict[str, torch.Tensor], shapes: Shapes | None = None) -> None:
        """Refuses, in one line, inputs that are not of `shapes` (default: the build shapes); a ranged engine
        without `shapes` (a pipeline's call) takes inputs whose every dimension lies in its range."""
        span = shapes is None and self.range.ranged
        build = shapes is None or shapes == self.shapes
        if span:
            lo, hi = self.input_shapes(self.range.min), self.input_shapes(self.range.max)
        wanted = self.manifest.shapes.inputs if build else self.input_shapes(shapes)
        for name, want in wanted.items():
            got = inputs.get(name)
            if got is None:
                raise SvdExportError(f"input {name!r} is missing")
            shape = list(got.shape)
            if span and (len(shape) != len(lo[name]) or not all(a <= g <= b for a, g, b in zip(lo[name], shape, hi[name]))):
                raise SvdExportError(f"input {name!r} has shape {tuple(shape)}; this ranged engine takes "
                                     f"{tuple(lo[name])} to {tuple(hi[name])}")
            if not span and shape != want:
                at = "this engine was built for" if build else f"at {shapes.to_dict()} it must be"
                raise SvdExportError(f"input {name!r} has shape {tuple(shape)}; {at} {tuple(want)}")

    def generate(self, inputs: dict[str, torch.Tensor] | None = None, seed: int = 0, steps: int | None = None,
                 progress: bool = False, labels: list[int] | None = None, batch: int | None = None,
                 height: int | None = None, width: int | None = None, **cache_overrides) -> Generation:
        """One request. `inputs` defaults to seeded synthetic ones of batch, height and width (default: the
        build's; a ranged engine takes any in its range, and given inputs set batch and text length);
        keyword overrides (`OVERRIDES`: plan, full_steps, interval, warmup, predictor, beta, order, gamma)
        change the plan or forecast without rebuilding. The step plan is the engine's, calibrated at the
        build shapes, whatever the request's shapes; the sampler's resolution shift is the request's."""
        text_len = None
        if inputs is not None and self.range.ranged:
            batch = batch or inputs["hidden_states"].shape[0]
            if "encoder_hidden_states" in inputs:
                text_len = inputs["encoder_hidden_states"].shape[1]
        shapes = self.request_shapes(batch, height, width, text_len)
        if inputs is None:
            inputs = self.example_inputs(seed, labels, shapes)
        self.check_inputs(inputs, shapes)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        steps = steps or self.steps
        cache = self.cache_config(**cache_overrides)
        plan = self.plan(steps, cache)
        result = self.sampler.generate(inputs, steps, cache=cache, progress=progress, plan=plan.mask, shapes=shapes,
                                       fitted=plan.fitted)
        self._made.remember(result.latents, shapes)  # preview(result.latents) at the request's shapes
        return result

    def cache_config(self, **overrides) -> CacheConfig:
        """The engine's cache settings with run-time overrides of the step plan or the forecast. Giving
        warmup or interval (and no plan) asks for the uniform plan they describe."""
        if set(overrides) - OVERRIDES:
            raise SvdExportError(f"cannot override {sorted(set(overrides) - OVERRIDES)} at run time "
                                 f"(allowed: {', '.join(sorted(OVERRIDES))})")
        if {"interval", "warmup"} & set(overrides) and "plan" not in overrides and "full_steps" not in overrides:
            overrides = {**overrides, "plan": "uniform"}
        return dataclasses.replace(self.cache, **overrides).validate()

    def plan(self, steps: int | None = None, cache: CacheConfig | None = None) -> RequestPlan:
        """Which of `steps` steps run the full graph under `cache` (default: the engine's settings)."""
        steps = steps or self.steps
        return plan_for(steps, cache or self.cache, self.manifest.plans, self.stats_for(steps), self._schedule_weights)

    def stats_for(self, steps: int):
        """The plan statistics of `steps` sampling steps where the build made them, else the build's own."""
        return self._stats_by_steps.get(steps, self.plan_stats)

    def _schedule_weights(self, steps: int):
        if steps not in self._weights:
            self._weights[steps] = schedule_weights(self.sampling, self.shapes, steps)
        return self._weights[steps]

    def step_cache(self, steps: int, cache: CacheConfig | None = None) -> StepCache:
        """Fresh cache state for one request of `steps` steps (used when something else owns the loop)."""
        cache = cache or self.cache
        plan = self.plan(steps, cache)
        if plan.fallback:  # nothing prints the plan of a loop someone else owns (a pipeline): say it once
            warnings.warn(f"{self.folder}: {plan.fallback}", stacklevel=2)
        return StepCache(self.full, self.cached, self.sampler.bases, cache, steps, plan.mask, plan.fitted)

    def eager_reference(self, dtype: torch.dtype | None = None) -> "Engine":
        """The same weights, bases and settings run by eager PyTorch: what every backend is measured against.
        With `dtype`, an eager twin in that precision (bench and compare set a bf16 engine against float32)."""
        manifest = self.manifest
        if dtype is not None and dtype != self.dtype:
            precision = str(dtype).removeprefix("torch.")  # its graphs take their inputs in it (the boundary's)
            manifest = dataclasses.replace(manifest, dtype=precision, backend="eager",
                                           graphs=retyped(manifest.graphs, manifest.dtype, precision))
            manifest.opened, manifest.signed = self.manifest.opened, self.manifest.signed  # not fields: not copied
        elif manifest.backend == "eager":
            return self
        full, cached = backend("eager").load(self.folder, manifest.load_spec(lambda: eager_graphs(manifest), self.folder))
        twin = Engine(self.folder, manifest, full, cached, self.bases)
        if self._swap.new:  # the same LoRAs, fused
            backend("eager").update_weights((full, cached), self._swap.new, manifest.load_spec())
            twin.loras, twin._swap = list(self.loras), self._swap
        return twin

    def load_lora(self, path, scale: float = 1.0) -> None:
        """Fuses one more LoRA file (diffusers, PEFT, Kohya or BFL names) into the engine's weights and pushes
        the changed weights into the compiled graphs, without recompiling them; the engine folder is untouched.
        LoRAs stack: each load fuses all loaded ones into the base weights again, in order."""
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise SvdExportError(f"LoRA scale must be a number, got {scale!r}") from None
        self.set_loras([*self.loras, LoraFile(Path(path), scale).check()])

    def unload_lora(self) -> None:
        """Pushes the base weights back (bit for bit: the values the engine was built with)."""
        self.set_loras([])

    def set_loras(self, loras: list[LoraFile]) -> None:
        """Exactly these LoRAs fused, in order, into the base weights (none: the base engine)."""
        if loras or self.loras:
            self.check_lora_support()
        wanted = WeightSwap()
        if loras:  # fused on a hollow transformer, into which only the adapted modules' base weights are read
            model = hollow_of(self.family.transformer_class(), self.config, self.dtype)
            fused = fuse(model, self.family.lora_loader, loras, fill=lambda names: base_weights(self.manifest, names))
            wanted = graph_weights(self.family, model, self.cache.granularity, fused)
        self.push_weights(wanted)
        self.loras = list(loras)

    def check_lora_support(self) -> None:
        """Refuses, in one line, an engine that cannot take LoRAs (its backend cannot replace weights, or its
        family has no diffusers LoRA loader)."""
        be = backend(self.manifest.backend)
        if (refusal := be.weights_refusal(self.manifest.backend_options)) is not None:
            raise SvdExportError(f"backend {be.name!r} cannot load a LoRA into a built engine: {refusal}")
        if self.family.lora_loader is None:
            raise SvdExportError(f"LoRAs are not supported for {self.family.name} models (no diffusers LoRA loader)")

    def lora_weights(self) -> int:
        """How many distinct weights the loaded LoRAs replaced."""
        return self._swap.count()

    def push_weights(self, wanted: WeightSwap, source: object = None) -> None:
        """Makes the graphs' weights the base ones except `wanted.new`; `source` says who asked (a pipeline
        running the engine gives its adapters so, and compares `weights_from` before pushing again)."""
        be = backend(self.manifest.backend)
        push, merged = to_push(self._swap, wanted.cast(self.dtype))
        be.update_weights((_inner(self.full), _inner(self.cached)), push, self.manifest.load_spec(folder=self.folder))
        for graph in (self.full, self.cached):
            if isinstance(graph, static.StaticGraph):
                graph.recapture()  # a captured CUDA graph may hold the old weight buffers' addresses
        self._swap = merged if merged.new else WeightSwap()
        self.weights_from = source

    def preview(self, latents: torch.Tensor, shapes: Shapes | None = None):
        """One picture of final latents at `shapes`; by default those of the request that made them, else the
        only shapes the engine serves that give latents of their shape (refused in one line if not one)."""
        shapes = shapes_for_preview(latents, shapes, self._made, self.range,
                                    lambda s: self.input_shapes(s)["hidden_states"])
        return self.family.preview(latents, shapes)

    def close(self) -> None:
        """Releases what loading extracted (AOTInductor's shared libraries) and the engine files it holds open;
        the engine is unusable after."""
        for graph in (self.full, self.cached):
            close = getattr(graph, "close", None)  # compiled graphs have it; eager modules do not
            if close is not None:
                close()
        release = getattr(self, "_release_files", None)  # set by `load` (an eager twin shares, not owns, them)
        if release is not None:
            release()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _inner(graph):
    """The backend's own graph under a CUDA-graph wrapper."""
    return graph.graph if isinstance(graph, static.StaticGraph) else graph


def load(folder, trusted_keys: list | None = None, weights=None) -> Engine:
    """The engine at `folder`, verified (see `svdexport.load`); `weights`: where the checkpoint an engine
    references is now, when it has moved (a file or folder, matched by sha256)."""
    folder = Path(folder)
    # Every engine file open and hashed; what follows loads those very files (manifest.path), never the names.
    manifest = manifest_io.read(folder, trusted_keys=trusted_keys)
    try:
        be = backend(manifest.backend)
        be.check()
        bases = Bases.load(manifest.path(folder, BASES_FILE))
        fields.check_bases(manifest, bases.vectors, folder / BASES_FILE)  # before the graphs load
        # The scheduler first: its import registers diffusers' output classes as pytree nodes, whose count guards
        # a graph compiled at load (inductor): imported after that compile, the first call would compile again.
        family(manifest.model.family).sampling(manifest.sampler).scheduler()
        spec = manifest.load_spec(lambda: eager_graphs(manifest), folder)
        if manifest.bound is not None:  # compiled graphs without weights: bound from the checkpoint's bytes
            spec.constants = open_bound(manifest, folder, weights)
        elif weights is not None:
            raise SvdExportError("--weights is for engines that reference a checkpoint; this one holds its weights")
        full, cached = be.load(folder, spec)
        # The GPU hot path: CUDA graphs over static buffers (one shape: not for ranged engines).
        if static.enabled(manifest.backend, manifest.device) and manifest.shapes.kind is EngineKind.STATIC:
            full, cached = static.static_pair(full, cached)
        engine = Engine(folder, manifest, full, cached, bases)
        manifest.opened.check_unchanged()  # and none was written in place while it was loaded
    except BaseException:
        manifest.opened.close()
        raise
    # The open files live as long as this engine (a refit or a LoRA may read them again): close() or the GC.
    engine._release_files = weakref.finalize(engine, manifest.opened.close)
    return engine
