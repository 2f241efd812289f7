"""`svdexport build` and `svdexport calibrate`: weights -> graphs -> bases -> exported programs -> engine."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from svdexport.cache.config import CacheConfig
from svdexport.cache.svd import Bases
from svdexport.errors import SvdExportError
from svdexport.export import GraphExport, backend, export_programs
from svdexport.models import family
from svdexport.models.base import parameter_count
from svdexport.runtime import manifest as manifest_io
from svdexport.runtime import memory
from svdexport.runtime.calibrate import calibrate
from svdexport.runtime.engine import BASES_FILE, TABLE_FILE
from svdexport.runtime.files import atomic_dir, atomic_file, check_replaceable

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BuildOptions:
    model: str = "flux"  # DiT family
    weights: str | None = None  # local diffusers folder or .safetensors; None = the bundled model
    backend: str = "eager"  # how the graphs become engines
    cache: CacheConfig = field(default_factory=CacheConfig)  # SVD-Cache settings; warmup/interval None = model's
    shapes: dict = field(default_factory=dict)  # overrides of the family's default build shapes
    dtype: str = "auto"  # weights and activations precision; "auto": bf16 on CUDA, fp32 on CPU
    device: str = "auto"  # "cpu", "cuda", or "auto" (cuda when a GPU is visible)
    calib_samples: int = 8  # calibration inputs
    calib_steps: int | None = None  # sampling steps per calibration input; None = the model's default steps
    calibration_prompts: str | None = None  # prompt file for models with text encoders; None = built-in list
    check_memory: bool = True  # refuse a build whose estimated peak memory exceeds what is available

    def validate(self) -> "BuildOptions":
        self.cache.validate()
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cpu", "cuda"):
            raise SvdExportError(f"unknown device {self.device!r} (choose from cpu, cuda)")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SvdExportError("--device cuda asked for, but no CUDA GPU is visible")
        if self.dtype == "auto":
            self.dtype = "bf16" if self.device == "cuda" else "fp32"
        if self.dtype not in DTYPES:
            raise SvdExportError(f"unknown dtype {self.dtype!r} (choose from {', '.join(DTYPES)}, auto)")
        if self.calib_samples < 1 or (self.calib_steps is not None and self.calib_steps < 1):
            raise SvdExportError("calibration needs at least one sample and one step")
        return self


@dataclass
class Prepared:
    """Everything a build derives before writing: the model, its graphs and the build shapes."""

    fam: object  # family module
    model: torch.nn.Module  # the diffusers transformer, on the build device
    info: object  # WeightsInfo
    shapes: object  # the family's Shapes
    full: torch.nn.Module  # full-compute graph
    cached: torch.nn.Module  # cached-step graph
    sites: list  # cache-site names
    sampler_config: dict  # flow-match scheduler config
    table: dict | None  # conditioning rows (class table, or encoded calibration prompts); None: synthetic
    steps: int  # default steps per image (calibration and run)
    memory: object  # runtime.memory.Estimate
    prompts: list | None = None  # calibration prompts, when the model has text encoders

    def inputs(self, seed: int, opts: BuildOptions) -> dict[str, torch.Tensor]:
        x = self.fam.example_inputs(self.info.config, self.shapes, seed, dtype=DTYPES[opts.dtype], table=self.table)
        return {k: v.to(opts.device) for k, v in x.items()}


def prepare(opts: BuildOptions) -> Prepared:
    """Checks everything cheap first (config, shapes, memory, prompts), then loads the weights."""
    opts.validate()
    fam = family(opts.model)
    info = fam.inspect(opts.weights)
    dim = fam.hidden_size(info.config)
    if opts.cache.k_max > dim:
        raise SvdExportError(f"k_max={opts.cache.k_max} exceeds the model's hidden size {dim}")
    shapes = fam.default_shapes(info)
    try:
        shapes = fam.Shapes(**{**shapes.__dict__, **opts.shapes}).validate()
    except TypeError as e:
        raise SvdExportError(f"bad shape option: {e}") from None
    sampler_config = fam.sampler_config(opts.weights, info.config)
    defaults = fam.run_defaults(info.config, sampler_config)
    opts.cache = dataclasses.replace(opts.cache, **{k: defaults[k] for k in ("warmup", "interval")
                                                     if getattr(opts.cache, k) is None}).validate()
    opts.calib_steps = opts.calib_steps or defaults["steps"]
    itemsize = DTYPES[opts.dtype].itemsize
    est = memory.estimate(fam.parameters(info.config), itemsize, fam.activation_bytes(info.config, shapes, itemsize),
                          opts.backend, opts.device)
    if opts.check_memory:
        memory.check(est, f"building this model with the {opts.backend} backend in {opts.dtype}")
    table, prompts = None, None
    if info.conditioning["kind"] == "class-table":
        table = fam.load_table(info.conditioning["file"])
        text_len = table["encoder_hidden_states"].shape[1]
        if shapes.text_len != text_len:
            raise SvdExportError(f"this model's class table has {text_len} text tokens; --text-len must be {text_len}")
    elif fam.has_text_encoders(info):
        # Real prompts through the pipeline's own text encoders, encoded before the transformer is loaded.
        prompts = fam.read_prompts(opts.calibration_prompts)
        table = fam.encode_prompts(info, prompts, shapes.text_len, DTYPES[opts.dtype], opts.device)
    elif opts.calibration_prompts:
        raise SvdExportError(f"--calibration-prompts needs text encoders; {info.source} has none "
                             "(a FLUX pipeline folder with text_encoder, text_encoder_2 and tokenizers)")
    model, info = fam.load(opts.weights, DTYPES[opts.dtype], info)
    model = model.to(opts.device)
    full, cached = fam.graphs(model, opts.cache.granularity)
    return Prepared(fam, model, info, shapes, full, cached, fam.sites(info.config, opts.cache.granularity),
                    sampler_config, table, defaults["steps"], est, prompts)


def run_calibration(p: Prepared, opts: BuildOptions, progress: bool) -> Bases:
    return calibrate(
        p.full, p.cached, p.sites, p.fam.hidden_size(p.info.config), p.fam.make_sampler(p.sampler_config),
        lambda s, n: p.fam.set_timesteps(s, n, p.shapes), lambda seed: p.inputs(seed, opts),
        opts.cache.tau, opts.cache.k_max, opts.calib_samples, opts.calib_steps, progress=progress,
        model_timestep=p.fam.model_timestep,
    )


def calibrate_to_file(opts: BuildOptions, out: Path, progress: bool = True) -> Bases:
    """`svdexport calibrate`: only the bases file, written atomically."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise SvdExportError(f"--out must end in .safetensors, got {out}")
    bases = run_calibration(prepare(opts), opts, progress)
    with atomic_file(out) as tmp:
        bases.save(tmp)
    return bases


def graph_exports(p: Prepared, bases: Bases, example: dict, opts: BuildOptions) -> dict[str, GraphExport]:
    """Both graphs with example inputs of the build shapes (the cached graph's from one real full step)."""
    state = {**example, "bases": bases.vectors.to(opts.device)}
    b = state["hidden_states"].shape[0]
    state["timestep"] = torch.full((b,), 0.5, dtype=DTYPES[opts.dtype], device=opts.device)
    with torch.no_grad():
        _, state["coeffs"], state["residuals"] = p.full(*[state[n] for n in p.full.input_names])
    return {name: GraphExport(g, tuple(state[n] for n in g.input_names), g.input_names, g.output_names)
            for name, g in (("full", p.full), ("cached", p.cached))}


def build_key(p: Prepared, opts: BuildOptions) -> str:
    """Digest of everything an engine depends on: same key, same engine."""
    parts = {"model": opts.model, "weights": p.info.digest(), "backend": opts.backend, "cache": opts.cache.to_dict(),
             "shapes": p.shapes.__dict__, "dtype": opts.dtype, "device": opts.device,
             "calibration": [opts.calib_samples, opts.calib_steps, p.prompts], "sampler": p.sampler_config,
             "versions": manifest_io.library_versions()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def existing(out: Path, key: str) -> dict | None:
    """The manifest of a valid engine at `out` built with the same key, else None."""
    if not (out / manifest_io.MANIFEST).exists():
        return None
    try:
        data = manifest_io.read(out)
    except SvdExportError:
        return None  # damaged or outdated: rebuild it
    return data if data.get("build_key") == key else None


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _describe(graphs: dict[str, GraphExport]) -> dict:
    return {
        name: {"inputs": g.input_names, "outputs": g.output_names, "parameters": parameter_count(g.module),
               "input_shapes": [list(a.shape) for a in g.args], "input_dtypes": [str(a.dtype)[6:] for a in g.args]}
        for name, g in graphs.items()
    }


def build(opts: BuildOptions, out: Path, graphs_dir: Path | None = None, progress: bool = True) -> dict:
    """Builds an engine folder at `out` (replaced only when the whole build succeeded); returns its manifest.

    An engine already at `out` with the same build key is reused (`manifest["reused"]` is then True).
    """
    start = time.perf_counter()
    out = Path(out)
    graphs_dir = Path(graphs_dir) if graphs_dir else Path("graphs") / out.name
    be = backend(opts.backend)
    be.check()
    check_replaceable(out)  # before the long work, not after it
    p = prepare(opts)
    key = build_key(p, opts)
    if (data := existing(out, key)) is not None:
        return {**data, "reused": True}
    if be.needs_export:
        check_replaceable(graphs_dir)
    bases = run_calibration(p, opts, progress)
    example = p.inputs(0, opts)
    graphs = graph_exports(p, bases, example, opts)
    graphs_ctx = atomic_dir(graphs_dir) if be.needs_export else contextlib.nullcontext(None)
    with atomic_dir(out) as tmp, graphs_ctx as gtmp:
        bases.save(tmp / BASES_FILE)
        conditioning = {"kind": "synthetic"}  # seeded embeddings of the right shapes stand in for text encoders
        if p.prompts is not None:  # the pipeline's text encoders make the conditioning at run time
            conditioning = {"kind": "pipeline", "calibration_prompts": p.prompts}
        elif p.table is not None:
            save_file({k: v.contiguous() for k, v in p.table.items()}, str(tmp / TABLE_FILE))
            conditioning = {"kind": "class-table", "file": TABLE_FILE, "labels": p.info.conditioning["labels"]}
        if be.needs_export:
            export_programs(graphs, gtmp)
            (gtmp / "manifest.json").write_text(json.dumps({"engine": str(out), "build_key": key}, indent=2))
        backend_record = be.build(graphs, tmp, gtmp)
        data = {
            "build_key": key,
            "backend": be.name,
            "backend_options": backend_record,
            "device": opts.device,
            "graphs_dir": str(graphs_dir) if be.needs_export else None,
            "model": {
                "family": opts.model,
                "config": {k: v for k, v in p.info.config.items() if not k.startswith("_")},
                "weights": p.info.record(),
                "pipeline_parts": p.info.pipeline_parts,
                "conditioning": conditioning,
            },
            "cache": opts.cache.to_dict(),
            "sites": [{"name": n, "rank": k, "energy": e} for n, k, e in zip(bases.sites, bases.ranks, bases.energy)],
            "calibration": {"num_inputs": bases.num_inputs, "num_timesteps": bases.num_timesteps,
                            "tau": bases.tau, "k_max": bases.k_max},
            "shapes": {"build": dict(p.shapes.__dict__),
                       "inputs": {k: list(v.shape) for k, v in example.items()}},
            "dtype": str(DTYPES[opts.dtype]).removeprefix("torch."),
            "steps": p.steps,
            "memory": {**p.memory.to_dict(), "measured_peak_rss_bytes": peak_rss()},
            "build_seconds": round(time.perf_counter() - start, 1),
            "sampler": p.sampler_config,
            "graphs": _describe(graphs),
        }
        return manifest_io.write(tmp, data)
