"""A loaded engine: load (verified manifest, the two graphs, the bases), plan (which steps run in full) and
generate (the step scheduler). The shapes it serves are runtime/shapes.py's, its LoRAs runtime/loras.py's."""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from pathlib import Path

import torch

from svdexport.cache.config import CacheConfig
from svdexport.cache.plan import StepPlan
from svdexport.cache.plan_stats import load_stats
from svdexport.cache.svd import Bases
from svdexport.errors import SvdExportError
from svdexport.export import backend
from svdexport.export.boundary import retyped
from svdexport.models import family
from svdexport.models.family import LATENTS, Conditioning, Shapes
from svdexport.models.lora import LoraFile
from svdexport.models.weights import load_table
from svdexport.runtime import manifest as manifest_io
from svdexport.runtime import fields, static
from svdexport.runtime.base import eager_graphs, skeleton_graphs
from svdexport.runtime.bound import open_bound
from svdexport.runtime.latent_shapes import MadeLatents, shapes_for_preview
from svdexport.runtime.loras import EngineLoras
from svdexport.runtime.manifest import BASES_FILE, PLAN_STATS_FILE, ConditioningKind, EngineKind, Manifest
from svdexport.runtime.plans import Planner
from svdexport.runtime.scheduler import CachedSampler, Generation, StepCache
from svdexport.runtime.shapes import ServedShapes

# Run-time overrides of the engine's cache settings: the plan and the forecast, never the bases.
OVERRIDES = {"interval", "warmup", "predictor", "beta", "order", "plan_kind", "full_steps", "gamma"}
FORMERLY = {"plan": "plan_kind"}  # override names of 0.4.0, still taken


class Engine:
    """Runs SVD-Cache generation over the engine's graphs: at the shapes it was built for (a static engine) or
    at any shapes in its range (a ranged one)."""

    def __init__(self, folder: Path, manifest: Manifest, full, cached, bases: Bases):
        self.folder, self.manifest, self.bases = folder, manifest, bases
        self.family = family(manifest.model.family)
        self.config = manifest.model.config
        self.shapes = self.family.shapes(manifest.shapes.build)  # a ranged engine's optimum
        self.range = manifest.shapes.range(self.family)
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
        fam, config, dtype = self.family, self.config, self.dtype  # no reference to self
        rows = None if self.table is None else Conditioning(self.table)
        self.served = ServedShapes(self.range, manifest.shapes.inputs,
                                   lambda s: fam.example_inputs(config, s, 0, dtype=dtype, conditioning=rows))
        self.sampling = self.family.sampling(manifest.sampler)
        self.sampler = CachedSampler(full, cached, bases.vectors.to(self.device), self.cache, self.sampling,
                                     self.shapes)
        # Through the manifest's resolver, as every file an engine opens: listed, hashed, inside the folder.
        stats = load_stats(manifest.path(folder, PLAN_STATS_FILE)) if PLAN_STATS_FILE in manifest.files else []
        self.planner = Planner(manifest.plans, stats, self.sampling, self.shapes)
        self.plan_stats = self.planner.stats  # at the build's step count
        self.lora = EngineLoras(manifest, folder, self.family, (full, cached))
        self._made = MadeLatents()  # the request shapes of the latents `generate` returned (for `preview`)

    # ------------------------------------------------------------------ shapes (runtime/shapes.py)
    def request_shapes(self, batch: int | None = None, height: int | None = None, width: int | None = None,
                       text_len: int | None = None) -> Shapes:
        """The build shapes with the given axes replaced; refused in one line outside the engine's range."""
        return self.served.request(batch, height, width, text_len)

    def input_shapes(self, shapes: Shapes) -> dict[str, list[int]]:
        """Every input's shape at `shapes`."""
        return self.served.inputs_at(shapes)

    def check_inputs(self, inputs: dict[str, torch.Tensor], shapes: Shapes | None = None) -> None:
        """Refuses, in one line, inputs not of `shapes` (default: the build shapes, or a ranged engine's range)."""
        self.served.check(inputs, shapes)

    def example_inputs(self, seed: int = 0, labels: list[int] | None = None,
                       shapes: Shapes | None = None) -> dict[str, torch.Tensor]:
        """Seeded noise and conditioning (the classes `labels` for a class-conditioned model, else
        synthetic embeddings) with `shapes` (default: the build shapes) and the engine's dtype."""
        if labels is not None and self.table is None:
            raise SvdExportError("this engine's model is not class-conditioned; it takes no labels")
        rows = None if self.table is None else Conditioning(self.table, labels)
        inputs = self.family.example_inputs(self.config, shapes or self.shapes, seed, dtype=self.dtype,
                                            conditioning=rows)
        return {k: v.to(self.device) for k, v in inputs.items()}

    # ------------------------------------------------------------------ generate
    def generate(self, inputs: dict[str, torch.Tensor] | None = None, seed: int = 0, steps: int | None = None,
                 progress: bool = False, labels: list[int] | None = None, batch: int | None = None,
                 height: int | None = None, width: int | None = None, **cache_overrides) -> Generation:
        """One request. `inputs` defaults to seeded synthetic ones of batch, height and width (default: the
        build's; a ranged engine takes any in its range, and given inputs set batch and text length);
        keyword overrides (`OVERRIDES`: plan_kind, full_steps, interval, warmup, predictor, beta, order, gamma)
        change the plan or forecast without rebuilding. The step plan is the engine's, calibrated at the
        build shapes, whatever the request's shapes; the sampler's resolution shift is the request's."""
        text_len = None
        if inputs is not None and self.range.ranged:
            batch = batch or inputs[LATENTS.name].shape[0]
            if self.family.text_input in inputs:
                text_len = inputs[self.family.text_input].shape[1]
        shapes = self.request_shapes(batch, height, width, text_len)
        if inputs is None:
            inputs = self.example_inputs(seed, labels, shapes)
        self.check_inputs(inputs, shapes)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        steps = steps or self.steps
        cache = self.cache_config(**cache_overrides)
        result = self.sampler.generate(inputs, steps, cache=cache, progress=progress, plan=self.plan(steps, cache),
                                       shapes=shapes)
        self._made.remember(result.latents, shapes)  # preview(result.latents) at the request's shapes
        return result

    def step_cache(self, steps: int, cache: CacheConfig | None = None) -> StepCache:
        """Fresh cache state for one request of `steps` steps (used when something else owns the loop)."""
        cache = cache or self.cache
        plan = self.plan(steps, cache)
        if plan.fallback:  # nothing prints the plan of a loop someone else owns (a pipeline): say it once
            warnings.warn(f"{self.folder}: {plan.fallback}", stacklevel=2)
        return StepCache(self.full, self.cached, self.sampler.bases, cache, plan)

    def preview(self, latents: torch.Tensor, shapes: Shapes | None = None):
        """One picture of final latents at `shapes`; by default those of the request that made them, else the
        only shapes the engine serves that give latents of their shape (refused in one line if not one)."""
        shapes = shapes_for_preview(latents, shapes, self._made, self.range,
                                    lambda s: self.input_shapes(s)[LATENTS.name])
        return self.family.preview(latents, shapes)

    # ------------------------------------------------------------------ plan (runtime/plans.py)
    def cache_config(self, **overrides) -> CacheConfig:
        """The engine's cache settings with run-time overrides of the step plan or the forecast. Giving
        warmup or interval (and no plan kind or budget) asks for the uniform plan they describe."""
        overrides = {FORMERLY.get(k, k): v for k, v in overrides.items()}
        if set(overrides) - OVERRIDES:
            raise SvdExportError(f"cannot override {sorted(set(overrides) - OVERRIDES)} at run time "
                                 f"(allowed: {', '.join(sorted(OVERRIDES))})")
        if {"interval", "warmup"} & set(overrides) and "plan_kind" not in overrides and "full_steps" not in overrides:
            overrides = {**overrides, "plan_kind": "uniform"}
        return dataclasses.replace(self.cache, **overrides).validate()

    def plan(self, steps: int | None = None, cache: CacheConfig | None = None) -> StepPlan:
        """Which of `steps` steps run the full graph under `cache` (default: the engine's settings), with a
        fitted predictor's forecast weights."""
        return self.planner.plan(steps or self.steps, cache or self.cache)

    def stats_for(self, steps: int):
        """The plan statistics of `steps` sampling steps where the build made them, else the build's own."""
        return self.planner.stats_for(steps)

    def step_sizes(self, steps: int):
        """The schedule's step sizes |sigma_{i+1} - sigma_i| at `steps` steps: the plan search's error weights."""
        return self.planner.step_sizes(steps)

    # ------------------------------------------------------------------ LoRAs (runtime/loras.py)
    @property
    def loras(self) -> list[LoraFile]:
        """The LoRA files fused into the graphs' weights now, in load order."""
        return list(self.lora.files)

    def load_lora(self, path, scale: float = 1.0) -> None:
        """Fuses one more LoRA file (diffusers, PEFT, Kohya or BFL names) into the engine's weights and pushes
        the changed weights into the compiled graphs, without recompiling them; the engine folder is untouched.
        LoRAs stack: each load fuses all loaded ones into the base weights again, in order."""
        self.lora.load(path, scale)

    def unload_lora(self) -> None:
        """Pushes the base weights back (bit for bit: the values the engine was built with)."""
        self.lora.unload()

    def set_loras(self, loras: list[LoraFile]) -> None:
        """Exactly these LoRAs fused, in order, into the base weights (none: the base engine)."""
        self.lora.set(loras)

    def lora_weights(self) -> int:
        """How many distinct weights the loaded LoRAs replaced."""
        return self.lora.count()

    # ------------------------------------------------------------------ load
    def eager_reference(self, dtype: torch.dtype | None = None) -> "Engine":
        """The same weights, bases, settings and LoRAs run by eager PyTorch: what every backend is measured
        against. With `dtype`, an eager twin in that precision (bench and compare set a bf16 engine against
        float32)."""
        manifest = self.manifest
        if manifest.backend == "eager" and (dtype is None or dtype == self.dtype):
            return self
        retype = {}
        if dtype is not None and dtype != self.dtype:
            precision = str(dtype).removeprefix("torch.")  # its graphs take their inputs in it (the boundary's)
            retype = dict(dtype=precision, graphs=retyped(manifest.graphs, manifest.dtype, precision))
        manifest = dataclasses.replace(manifest, backend="eager", **retype)  # the twin's graphs are eager
        manifest.opened, manifest.signed = self.manifest.opened, self.manifest.signed  # not fields: not copied
        spec = manifest.load_spec(lambda: eager_graphs(manifest), self.folder)
        full, cached = backend("eager").load(self.folder, spec)
        twin = Engine(self.folder, manifest, full, cached, self.bases)
        self.lora.copy_to(twin.lora)
        return twin

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
        spec.skeleton_graphs = lambda: skeleton_graphs(manifest)
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
