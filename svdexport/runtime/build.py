"""`svdexport build` and `svdexport calibrate`: weights -> graphs -> bases -> engine folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from svdexport.cache.config import CacheConfig
from svdexport.cache.svd import Bases
from svdexport.errors import SvdExportError
from svdexport.export import backend
from svdexport.models import family
from svdexport.models.base import parameter_count
from svdexport.runtime import manifest as manifest_io
from svdexport.runtime.calibrate import calibrate
from svdexport.runtime.engine import BASES_FILE
from svdexport.runtime.files import atomic_dir, atomic_file, check_replaceable

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BuildOptions:
    model: str = "flux"  # DiT family
    weights: str | None = None  # local diffusers folder or .safetensors; None = the bundled model
    backend: str = "eager"  # how the graphs become engines
    cache: CacheConfig = field(default_factory=CacheConfig)  # SVD-Cache settings
    shapes: dict = field(default_factory=dict)  # overrides of the family's default build shapes
    dtype: str = "fp32"  # weights and activations precision
    calib_samples: int = 8  # calibration inputs
    calib_steps: int = 50  # sampling steps per calibration input

    def validate(self) -> "BuildOptions":
        self.cache.validate()
        if self.dtype not in DTYPES:
            raise SvdExportError(f"unknown dtype {self.dtype!r} (choose from {', '.join(DTYPES)})")
        if self.calib_samples < 1 or self.calib_steps < 1:
            raise SvdExportError("calibration needs at least one sample and one step")
        return self


@dataclass
class Prepared:
    """Everything a build derives before writing: the model, its graphs and the build shapes."""

    fam: object  # family module
    model: torch.nn.Module  # the diffusers transformer
    info: object  # WeightsInfo
    shapes: object  # the family's Shapes
    full: torch.nn.Module  # full-compute graph
    cached: torch.nn.Module  # cached-step graph
    sites: list  # cache-site names


def prepare(opts: BuildOptions) -> Prepared:
    opts.validate()
    fam = family(opts.model)
    model, info = fam.load(opts.weights, DTYPES[opts.dtype])
    dim = fam.hidden_size(info.config)
    if opts.cache.k_max > dim:
        raise SvdExportError(f"k_max={opts.cache.k_max} exceeds the model's hidden size {dim}")
    shapes = fam.default_shapes(info.config)
    try:
        shapes = fam.Shapes(**{**shapes.__dict__, **opts.shapes}).validate()
    except TypeError as e:
        raise SvdExportError(f"bad shape option: {e}") from None
    full, cached = fam.graphs(model, opts.cache.granularity)
    return Prepared(fam, model, info, shapes, full, cached, fam.sites(info.config, opts.cache.granularity))


def run_calibration(p: Prepared, opts: BuildOptions, sampler_config: dict, progress: bool) -> Bases:
    sampler = p.fam.make_sampler(sampler_config)
    dtype = DTYPES[opts.dtype]
    return calibrate(
        p.full, p.cached, p.sites, p.fam.hidden_size(p.info.config), sampler,
        lambda s, n: p.fam.set_timesteps(s, n, p.shapes),
        lambda seed: p.fam.example_inputs(p.info.config, p.shapes, seed, dtype=dtype),
        opts.cache.tau, opts.cache.k_max, opts.calib_samples, opts.calib_steps, progress=progress,
    )


def calibrate_to_file(opts: BuildOptions, out: Path, progress: bool = True) -> Bases:
    """`svdexport calibrate`: only the bases file, written atomically."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise SvdExportError(f"--out must end in .safetensors, got {out}")
    p = prepare(opts)
    bases = run_calibration(p, opts, p.fam.sampler_config(opts.weights), progress)
    with atomic_file(out) as tmp:
        bases.save(tmp)
    return bases


def build(opts: BuildOptions, out: Path, progress: bool = True) -> dict:
    """Builds an engine folder at `out` (replaced only when the whole build succeeded); returns its manifest."""
    be = backend(opts.backend)
    check_replaceable(Path(out))  # before the long work, not after it
    p = prepare(opts)
    sampler_config = p.fam.sampler_config(opts.weights)
    bases = run_calibration(p, opts, sampler_config, progress)
    example = p.fam.example_inputs(p.info.config, p.shapes, 0, dtype=DTYPES[opts.dtype])
    with atomic_dir(Path(out)) as tmp:
        bases.save(tmp / BASES_FILE)
        backend_record = be.build(p.full, p.cached, example, tmp)
        data = {
            "backend": be.name,
            "backend_options": backend_record,
            "model": {
                "family": opts.model,
                "config": {k: v for k, v in p.info.config.items() if not k.startswith("_")},
                "weights": p.info.record(),
                "pipeline_parts": p.info.pipeline_parts,
                "conditioning": "synthetic",  # no text encoders are run: seeded embeddings of the right shapes
            },
            "cache": opts.cache.to_dict(),
            "sites": [{"name": n, "rank": k, "energy": e} for n, k, e in zip(bases.sites, bases.ranks, bases.energy)],
            "calibration": {"num_inputs": bases.num_inputs, "num_timesteps": bases.num_timesteps,
                            "tau": bases.tau, "k_max": bases.k_max},
            "shapes": {"build": dict(p.shapes.__dict__), "inputs": {k: list(v.shape) for k, v in example.items()}},
            "dtype": str(DTYPES[opts.dtype]).removeprefix("torch."),
            "sampler": sampler_config,
            "graphs": {
                name: {"inputs": g.input_names, "outputs": g.output_names, "parameters": parameter_count(g)}
                for name, g in (("full", p.full), ("cached", p.cached))
            },
        }
        return manifest_io.write(tmp, data)
