"""`svdexport build` and `svdexport calibrate`: weights -> family graphs -> bases -> exported programs ->
engine folder with its typed manifest."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from svdexport.builder import bases_file, memory, precision, quantized, sparse
from svdexport.builder.records import describe, existing, peak_rss
from svdexport.builder.calibrate import CALIBRATION_SEED, CalibrationSettings, calibrate
from svdexport.builder.step_plans import calibrate_plan
from svdexport.builder.bound import write_bound
from svdexport.builder.ranged import range_states, shapes_record
from svdexport.cache.plan_stats import save_stats
from svdexport.cache.config import CacheConfig
from svdexport.cache.predictors import FITTED
from svdexport.cache.svd import Bases
from svdexport.errors import SvdExportError
from svdexport.export import GraphExport, backend, export_programs
from svdexport.files import atomic_dir
from svdexport.models import family
from svdexport.outputs import check_dir, output_lock
from svdexport.progress import phase
from svdexport.models.family import BASES, COEFFS, LATENTS, RESIDUALS, TIMESTEP, Conditioning, Family, Sampling, Shapes
from svdexport.models.mapped import MappedWeights
from svdexport.models.ranges import ShapeRange, shape_range
from svdexport.models.weights import WeightsInfo, load_table, read_prompts
from svdexport.runtime import manifest as mf
from svdexport.runtime.manifest import BASES_FILE, PLAN_STATS_FILE, TABLE_FILE, ConditioningKind

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BuildOptions:
    model: str = "flux"  # DiT family
    weights: str | None = None  # local diffusers folder or .safetensors; None = the bundled model
    backend: str = "eager"  # how the graphs become engines
    cache: CacheConfig = field(default_factory=CacheConfig)  # SVD-Cache settings; warmup/interval None = model's
    shapes: dict = field(default_factory=dict)  # overrides of the family's default build shapes
    min_shapes: dict = field(default_factory=dict)  # --min-*: a ranged engine's smallest shapes (issue 15)
    max_shapes: dict = field(default_factory=dict)  # --max-*: its largest; neither given: a static engine
    calib_shapes: list = field(default_factory=list)  # --calib-shapes: (height, width) calibrated on besides the build's
    dtype: str = "auto"  # weights and activations precision; "auto": build/precision.py's rule
    device: str = "auto"  # "cpu", "cuda", or "auto" (cuda when a GPU is visible)
    calib_samples: int = 8  # calibration inputs
    calib_steps: int | None = None  # sampling steps per calibration input; None = the model's default steps
    # Other step counts to keep plan statistics for (one more pass over the calibration inputs each), so that
    # requests of those steps get plans searched and a fitted forecast's weights fitted at their own count.
    plan_steps: list[int] = field(default_factory=list)
    calibration_prompts: str | None = None  # prompt file for models with text encoders; None = built-in list
    check_memory: bool = True  # refuse a build whose estimated peak memory exceeds what is available
    # Keep the weights inside the engine (a self-contained engine, to ship) instead of referencing the local
    # checkpoint's files (build/bound.py); bundled models are always kept inside.
    embed_weights: bool = False
    force: bool = False  # replace an output that svdexport did not write
    bases: str | None = None  # a `svdexport calibrate` file to use instead of calibrating (builder/bases_file.py)
    dtype_reason: str = ""  # why this dtype (set by prepare: "auto: this CPU has AVX512-BF16 ...")
    # Closed-loop refinement of calibrated plans (plan.refine): plans scored by cached sampling against full
    # compute on `refine_samples` calibration inputs, at most `refine_evaluations` plans per budget (0: the
    # DP's plan as it is), for the build's budget and `refine_budgets` (None: REFINE_OFFSETS around it).
    refine_evaluations: int = 0  # opt-in: see README (on held-out seeds it raised the mean, lost the worst sample)
    refine_samples: int = 32
    refine_budgets: list[int] | None = None
    attention: str = "dense"  # dense | sparse[:tile=AxB[xC],window=N|AxB[xC]] (builder/sparse.py)
    quantize: str = "none"  # none | int8 | fp8 | auto: quantized graphs (builder/quantized.py; aoti only)

    def validate(self) -> "BuildOptions":
        self.cache.validate()
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cpu", "cuda"):
            raise SvdExportError(f"unknown device {self.device!r} (choose from cpu, cuda)")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SvdExportError("--device cuda asked for, but no CUDA GPU is visible")
        if self.dtype not in (*DTYPES, "auto"):  # "auto" is resolved by prepare, which knows the model
            raise SvdExportError(f"unknown dtype {self.dtype!r} (choose from {', '.join(DTYPES)}, auto)")
        if self.calib_samples < 1 or (self.calib_steps is not None and self.calib_steps < 1):
            raise SvdExportError("calibration needs at least one sample and one step")
        if any(n < 2 for n in self.plan_steps):
            raise SvdExportError(f"--plan-steps needs step counts of at least 2, got {self.plan_steps}")
        if self.plan_steps and self.cache.plan_kind != "calibrated" and self.cache.predictor not in FITTED:
            raise SvdExportError(f"--plan-steps plans for a calibrated plan or fits a fitted forecast; a uniform plan "
                                 f"with {self.cache.predictor} keeps no plan statistics")
        if self.refine_evaluations < 0 or self.refine_samples < 1 or any(b < 1 for b in self.refine_budgets or ()):
            raise SvdExportError("refinement needs evaluations >= 0, samples >= 1 and budgets >= 1")
        self.attention = sparse.normalized(self)
        quantized.check(self)  # refused in one line where no scheme ships; an int8 CPU build is fp32
        return self


@dataclass
class Prepared:
    """Everything a build derives before writing: the model, its graphs and the build shapes."""

    fam: Family
    model: torch.nn.Module  # the diffusers transformer, on the build device
    loaded: MappedWeights  # the checkpoint files it was mapped from, and where each weight is in them
    info: WeightsInfo
    shapes: Shapes  # the build shapes (a ranged engine's optimum)
    range: ShapeRange  # the shapes the engine serves (static: the build shapes only)
    full: torch.nn.Module  # full-compute graph
    cached: torch.nn.Module  # cached-step graph
    sites: list[str]  # cache-site names
    sampling: Sampling  # the family's sampling rule over the scheduler config
    table: dict | None  # conditioning rows (class table, or encoded calibration prompts); None: synthetic
    steps: int  # default steps per image (calibration and run)
    memory: memory.Estimate
    prompts: list | None = None  # calibration prompts, when the model has text encoders

    def inputs(self, seed: int, opts: BuildOptions, shapes: Shapes | None = None) -> dict[str, torch.Tensor]:
        x = self.fam.example_inputs(self.info.config, shapes or self.shapes, seed, dtype=DTYPES[opts.dtype],
                                    conditioning=None if self.table is None else Conditioning(self.table))
        return {k: v.to(opts.device) for k, v in x.items()}


def prepare(opts: BuildOptions) -> Prepared:
    """Checks everything cheap first (config, shapes, memory, prompts), then loads the weights."""
    opts.validate()
    fam = family(opts.model)
    info = fam.inspect(opts.weights)
    if opts.dtype == "auto" or not opts.dtype_reason:
        opts.dtype, opts.dtype_reason = precision.resolve(opts.dtype, opts.device, opts.backend, info.precision)
    dim = fam.hidden_size(info.config)
    if opts.cache.k_max > dim:
        raise SvdExportError(f"k_max={opts.cache.k_max} exceeds the model's hidden size {dim}")
    shapes = fam.shapes({**fam.default_shapes(info).to_dict(), **opts.shapes})
    layout = sparse.layout(opts, shapes)  # refused here, before the weights load, if it cannot fit the shapes
    ranges = shape_range(fam.name, shapes, opts.min_shapes, opts.max_shapes)
    for h, w in opts.calib_shapes:  # calibration shapes are shapes the engine serves
        ranges.request(height=h, width=w)
    sampling = fam.sampling(fam.sampler_config(opts.weights, info.config))
    defaults = fam.run_defaults(info.config, sampling.config)
    opts.cache = dataclasses.replace(opts.cache, **{k: getattr(defaults, k) for k in ("warmup", "interval")
                                                     if getattr(opts.cache, k) is None}).validate()
    opts.calib_steps = opts.calib_steps or defaults.steps
    opts.plan_steps = sorted(set(opts.plan_steps) - {opts.calib_steps})
    itemsize = DTYPES[opts.dtype].itemsize
    est = memory.estimate(fam.parameters(info.config), itemsize, fam.activation_bytes(info.config, shapes, itemsize),
                          quantized.weight_copies(opts), opts.device)
    if opts.check_memory:
        memory.check(est, f"building this model with the {opts.backend} backend in {opts.dtype}")
    table, prompts = None, None
    if info.conditioning["kind"] == ConditioningKind.CLASS_TABLE.value:
        table = load_table(info.conditioning["file"])
        text_len = table[fam.text_input].shape[1]
        if shapes.text_len != text_len:
            raise SvdExportError(f"this model's class table has {text_len} text tokens; --text-len must be {text_len}")
        if ranges.min.text_len != ranges.max.text_len:
            raise SvdExportError(f"this model's class table has {text_len} text tokens: no --min-text-len or "
                                 "--max-text-len")
    elif fam.prompts is not None and fam.prompts.available(info):
        # Real prompts through the pipeline's own text encoders, encoded before the transformer is loaded.
        prompts = read_prompts(opts.calibration_prompts)
        table = fam.prompts.encode(info, prompts, shapes.text_len, DTYPES[opts.dtype], opts.device)
    if opts.calibration_prompts and prompts is None:
        raise SvdExportError(f"--calibration-prompts needs text encoders; {info.source} has none "
                             f"(a {fam.name} pipeline folder with its text encoders and tokenizers)")
    loaded = fam.load_weights(info, DTYPES[opts.dtype])
    model = sparse.installed(loaded.model.to(opts.device), layout)
    full, cached = fam.graphs(model, opts.cache.granularity)
    return Prepared(fam, model, loaded, info, shapes, ranges, full, cached, fam.sites(info.config, opts.cache.granularity),
                    sampling, table, defaults.steps, est, prompts)


def run_calibration(p: Prepared, opts: BuildOptions, progress: bool) -> Bases:
    """The bases, from inputs of the build shapes, or cycling through them and --calib-shapes; or `--bases`."""
    if opts.bases:
        return bases_file.given_bases(p, opts)
    settings = CalibrationSettings(opts.calib_samples, opts.calib_steps, opts.cache.tau, opts.cache.k_max)
    cycle = [p.shapes] + [p.range.request(height=h, width=w) for h, w in opts.calib_shapes]
    shapes_of = lambda seed: cycle[(seed - CALIBRATION_SEED) % len(cycle)]  # noqa: E731
    return calibrate(p.full, p.cached, p.sampling, p.shapes, p.sites, p.fam.hidden_size(p.info.config),
                     lambda seed: p.inputs(seed, opts, shapes_of(seed)), settings, progress=progress,
                     shapes_of=shapes_of)


def graph_state(p: Prepared, bases: Bases, example: dict, opts: BuildOptions) -> dict[str, torch.Tensor]:
    """Every input of both graphs: `example`, the bases, a timestep, and C and R of one full step; each as the
    family's graph contract types it (a family's inputs that break it are refused before the export)."""
    state = {**example, BASES.name: bases.vectors.to(opts.device)}
    b = state[LATENTS.name].shape[0]
    state[TIMESTEP.name] = torch.full((b,), 0.5, dtype=TIMESTEP.torch_dtype(DTYPES[opts.dtype]), device=opts.device)
    with torch.no_grad():
        _, state[COEFFS.name], state[RESIDUALS.name] = p.full(*[state[n] for n in p.full.input_names])
    p.fam.contract(p.info.config, opts.cache.granularity).check(state, DTYPES[opts.dtype])
    return state


def graph_exports(p: Prepared, bases: Bases, example: dict, opts: BuildOptions) -> dict[str, GraphExport]:
    """Both graphs with example inputs of the build shapes (the cached graph's from one real full step);
    a ranged engine's also with their shapes at the ends of its range (`ranged.range_states`)."""
    if not p.range.ranged:
        state, ends = graph_state(p, bases, example, opts), None
    else:
        state, ends = range_states(p, lambda shapes: p.inputs(0, opts, shapes),
                                   lambda ex: graph_state(p, bases, ex, opts))
    graphs = {}
    for name, g in (("full", p.full), ("cached", p.cached)):
        args = lambda st: tuple(st[n] for n in g.input_names)  # noqa: E731
        lo, hi = (args(ends[0]), args(ends[1])) if ends else (None, None)
        graphs[name] = GraphExport(g, args(state), g.input_names, g.output_names, min_args=lo, max_args=hi)
    return graphs


def build_key(p: Prepared, opts: BuildOptions) -> str:
    """Digest of everything an engine depends on: same key, same engine."""
    parts = {"model": opts.model, "weights": p.info.digest(), "backend": opts.backend, "cache": opts.cache.to_dict(),
             "shapes": p.shapes.to_dict(), "dtype": opts.dtype, "device": opts.device,
             "calibration": [opts.calib_samples, opts.calib_steps, p.prompts],
             "refine": [opts.refine_evaluations, opts.refine_samples, opts.refine_budgets], "sampler": p.sampling.config,
             "versions": mf.library_versions()}
    # Issue 15's settings enter the key only when used: a static engine keeps the key it had before.
    if p.range.ranged:
        parts["range"] = p.range.to_dicts()
    if opts.calib_shapes:
        parts["calib_shapes"] = opts.calib_shapes
    if opts.plan_steps:
        parts["plan_steps"] = opts.plan_steps
    if opts.embed_weights:
        parts["embed_weights"] = True
    if opts.bases:
        parts["bases"] = bases_file.digest(opts.bases)
    parts.update(sparse.key_parts(opts))
    parts.update(quantized.key_parts(opts))
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def build(opts: BuildOptions, out: Path, graphs_dir: Path | None = None,
          progress: bool = True) -> tuple[mf.Manifest, bool]:
    """Builds an engine folder at `out` (replaced only when the whole build succeeded); returns its manifest
    and whether an engine already at `out` with the same build key was reused instead.

    Both output folders are checked before the work and locked during it (a second build into the same
    folder is refused), and what killed builds left beside them is removed."""
    out = Path(out)
    graphs_dir = Path(graphs_dir) if graphs_dir else Path("graphs") / out.name
    be = backend(opts.backend)
    be.check()
    check_dir(out, "--out", opts.force)  # before the long work, not after it
    if be.needs_export:
        check_dir(graphs_dir, "--graphs", opts.force, engine_ok=False)
        if Path(os.path.abspath(graphs_dir)) == Path(os.path.abspath(out)):
            raise SvdExportError(f"--graphs and --out are the same folder {out}")
    with output_lock(out), (output_lock(graphs_dir) if be.needs_export else contextlib.nullcontext()):
        return _build(opts, out, graphs_dir, progress, be)


def _build(opts: BuildOptions, out: Path, graphs_dir: Path, progress: bool, be) -> tuple[mf.Manifest, bool]:
    start = time.perf_counter()
    p = prepare(opts)
    key = build_key(p, opts)
    if (manifest := existing(out, key)) is not None:
        return manifest, True
    bases = run_calibration(p, opts, progress)
    # A fitted predictor's weights come from the plan statistics, so it keeps them with a uniform plan too.
    planned = opts.cache.plan_kind == "calibrated" or opts.cache.predictor in FITTED
    stats, plan_records = calibrate_plan(p, opts, bases, progress) if planned else (None, [])
    example = p.inputs(0, opts)
    graphs = graph_exports(p, bases, example, opts)
    quantized.apply(p, graphs, opts)  # only the exported graphs: calibration ran on the unquantized model
    graphs_ctx = atomic_dir(graphs_dir, opts.force) if be.needs_export else contextlib.nullcontext(None)
    with atomic_dir(out, opts.force) as tmp, graphs_ctx as gtmp:
        bases.save(tmp / BASES_FILE)
        if stats is not None:
            save_stats(stats, tmp / PLAN_STATS_FILE)
        conditioning = mf.Conditioning(ConditioningKind.SYNTHETIC)
        if p.prompts is not None:  # the pipeline's text encoders make the conditioning at run time
            conditioning = mf.Conditioning(ConditioningKind.PIPELINE, calibration_prompts=p.prompts)
        elif p.table is not None:
            save_file({k: v.contiguous() for k, v in p.table.items()}, str(tmp / TABLE_FILE))
            conditioning = mf.Conditioning(ConditioningKind.CLASS_TABLE, file=TABLE_FILE,
                                           labels=p.info.conditioning["labels"])
        bound = None
        if be.needs_export:
            export_programs(graphs, gtmp)
            with phase("binding the weights (bindings.json, constants.safetensors)", shown_from=1.0):
                bound = write_bound(p, graphs, tmp, opts.embed_weights)
            (gtmp / "manifest.json").write_text(json.dumps({"engine": str(out), "build_key": key}, indent=2))
        for name in be.carried:  # caches of the engine this build replaces (TensorRT's timing cache)
            if (out / name).is_file():
                shutil.copy2(out / name, tmp / name)
        backend_record = be.build(graphs, tmp, gtmp)
        weights = p.info.record()
        manifest = mf.Manifest(
            build_key=key,
            backend=be.name,
            backend_options=backend_record,
            device=opts.device,
            graphs_dir=str(graphs_dir) if be.needs_export else None,
            model=mf.ModelRecord(family=opts.model, config={k: v for k, v in p.info.config.items() if not k.startswith("_")},
                                 weights=mf.WeightsRecord(weights["source"], weights["sha256"], weights["files"]),
                                 pipeline_parts=p.info.pipeline_parts, conditioning=conditioning),
            cache=opts.cache,
            sites=[mf.SiteRecord(n, k, e) for n, k, e in zip(bases.sites, bases.ranks, bases.energy)],
            calibration=mf.CalibrationRecord(bases.num_inputs, bases.num_timesteps, bases.tau, bases.k_max,
                                             [list(s) for s in opts.calib_shapes],
                                             [st.steps for st in stats[1:]] if stats else []),
            shapes=shapes_record(p, example),
            dtype=str(DTYPES[opts.dtype]).removeprefix("torch."),
            steps=p.steps,
            memory={**p.memory.to_dict(), "measured_peak_rss_bytes": peak_rss()},
            build_seconds=round(time.perf_counter() - start, 1),
            sampler=p.sampling.config,
            graphs=describe(graphs),
            plans=plan_records,
            bound=bound,
            attention=sparse.record(p.model),
        )
        with phase("hashing the engine files (manifest.json)", shown_from=1.0):
            return mf.write(tmp, manifest), False
