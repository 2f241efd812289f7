"""The engine manifest: the one place that knows the on-disk format of an engine folder.

`manifest.json` records what was built, from what, with which libraries, and the sha256 of every file in
the folder plus a digest of its own content (`manifest_sha256`), so an edited manifest is refused as
surely as an edited engine file. On read it is verified, then parsed into typed dataclasses; a missing
or mistyped field is refused in one line naming it. Engines of svdexport 0.2 have the same layout.

The digest catches accidents, not an attacker (anyone can recompute it): an engine is code, and only a
signature (`runtime/trust.py`) by a trusted key makes an engine from elsewhere safe to load. Every name in
`files` is a plain relative path that resolves inside the folder, and backends open files only through
`Manifest.path`, which refuses names the manifest does not list.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from svdexport.cache.config import CacheConfig
from svdexport.errors import SvdExportError
from svdexport.export import GraphSpec, LoadSpec
from svdexport.files import confined, sha256_file
from svdexport.models.ranges import ShapeRange, static
from svdexport.runtime import trust

FORMAT = "svdexport.engine/1"
MANIFEST = "manifest.json"
BASES_FILE = "bases.safetensors"
TABLE_FILE = "conditioning.safetensors"  # class-conditioning table, for models that have one
PLAN_STATS_FILE = "plan_stats.safetensors"  # cross-step feature inner products: plans for other budgets at run time


class ConditioningKind(str, Enum):
    SYNTHETIC = "synthetic"  # seeded embeddings of the right shapes stand in for text encoders
    CLASS_TABLE = "class-table"  # rows of a table in the engine folder (the bundled digits model)
    PIPELINE = "pipeline"  # the weights folder's text encoders make it at run time


@dataclass
class Conditioning:
    kind: ConditioningKind
    file: str | None = None  # class-table: the table's file name inside the engine folder
    labels: list[str] | None = None  # class-table: class names, in table order
    calibration_prompts: list[str] | None = None  # pipeline: the prompts the bases were calibrated on


@dataclass
class WeightsRecord:
    source: str  # "bundled:NAME" or the absolute path the engine was built from
    sha256: str  # digest of the weight files (or of the generated state dict)
    files: list  # [name, size, mtime_ns] per file: unchanged files are not re-hashed at load


@dataclass
class ModelRecord:
    family: str  # registry name of the DiT family
    config: dict  # the transformer's diffusers config
    weights: WeightsRecord
    pipeline_parts: list[str]  # pipeline folders found beside the transformer
    conditioning: Conditioning


@dataclass
class SiteRecord:
    name: str
    rank: int  # k chosen by the energy rule
    energy: float  # fraction of the calibration energy the kept directions capture


@dataclass
class CalibrationRecord:
    num_inputs: int
    num_timesteps: int
    tau: float
    k_max: int
    # --calib-shapes: [height, width] of the inputs calibrated on besides the build shapes (they take turns)
    shapes: list[list[int]] = field(default_factory=list)
    # --plan-steps: step counts with plan statistics of their own besides num_timesteps (in plan_stats)
    plan_steps: list[int] = field(default_factory=list)


@dataclass
class PlanRecord:
    """A calibrated step plan: the full steps of `steps` sampling steps, chosen on the calibration inputs."""

    steps: int  # sampling steps the plan is for
    full_steps: list[int]  # indices of the steps that run the full graph, sorted, starting with 0
    cost: float  # weighted forecast error of its cached steps on the calibration trajectories
    uniform_cost: float | None  # the same for the uniform plan, when it has as many full steps
    gamma: float  # residual damping the plan was searched with
    order: int = 1  # forecast order of the error model it was searched with (1: Taylor, 0: reuse)
    score: float | None = None  # mean PSNR (dB) of its cached sampling against full compute on the calibration inputs
    refined: bool = False  # refined in closed loop (plan.refine) from the DP's plan of least forecast error
    forecast: str = "taylor"  # the error model searched: "taylor" (order, gamma) or "fitted" (cache/fitted.py)


class EngineKind(str, Enum):
    STATIC = "static"  # one shape per engine: the build shapes
    RANGED = "ranged"  # every shape between shapes.min and shapes.max (issue 15)


@dataclass
class ShapesRecord:
    build: dict  # the family's build shapes (batch, height, width, text_len, ...); a ranged engine's optimum
    inputs: dict[str, list[int]]  # graph input shapes at the build shapes (a static engine's only ones)
    kind: EngineKind = EngineKind.STATIC  # engines from before issue 15 have no kind: static
    min: dict | None = None  # ranged: the smallest shapes served (same axes as build)
    max: dict | None = None  # ranged: the largest

    def range(self, family) -> ShapeRange:
        """The shapes this engine serves (a static engine: its build shapes only)."""
        opt = family.shapes(self.build)
        if self.kind is EngineKind.STATIC:
            return static(opt)
        if self.min is None or self.max is None:
            raise SvdExportError("manifest field shapes.min and shapes.max are required for a ranged engine")
        return ShapeRange(family.shapes(self.min), opt, family.shapes(self.max))


@dataclass
class Manifest:
    build_key: str  # digest of everything the engine depends on: same key, same engine
    backend: str
    backend_options: dict  # what the backend recorded about its files
    device: str
    graphs_dir: str | None  # where the exported programs went (None for eager)
    model: ModelRecord
    cache: CacheConfig
    sites: list[SiteRecord]
    calibration: CalibrationRecord
    shapes: ShapesRecord
    dtype: str  # "float32", "bfloat16", ...
    steps: int  # the model's default steps per sample
    memory: dict  # estimated and measured build memory
    build_seconds: float
    sampler: dict  # the scheduler config
    graphs: dict[str, GraphSpec]
    plans: list[PlanRecord] = field(default_factory=list)  # calibrated plans (none for uniform builds and 0.2)
    format: str = FORMAT
    versions: dict = field(default_factory=dict)  # library versions at build time
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256, every file but this one
    manifest_sha256: str = ""

    def path(self, folder: Path, name: str) -> Path:
        """folder/name for a file this manifest lists (and hashed at read); anything else is refused."""
        return confined(folder, name, self.files)

    def load_spec(self, eager_graphs=None, folder: Path | None = None) -> LoadSpec:
        resolve = None if folder is None else (lambda name: self.path(folder, name))
        return LoadSpec(self.graphs, self.dtype, self.device, eager_graphs, resolve, self.backend_options,
                        ranged=self.shapes.kind is EngineKind.RANGED)

    def to_dict(self) -> dict:
        data = _plain(dataclasses.asdict(self))
        cond = data["model"]["conditioning"]  # only the fields of its kind, as 0.2 wrote them
        data["model"]["conditioning"] = {k: v for k, v in cond.items() if v is not None}
        # Issue 15's fields only where they say something: a static engine's manifest records just its kind.
        data["shapes"] = {k: v for k, v in data["shapes"].items() if v is not None}
        for k in ("shapes", "plan_steps"):  # options that, unused, leave the manifest as it was before them
            if not data["calibration"][k]:
                del data["calibration"][k]
        return data


def _plain(x):
    if isinstance(x, Enum):
        return x.value
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def _parse(tp, value, where: str):
    """`value` (parsed JSON) as type `tp`, recursively; a mismatch raises naming the field."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _parse(next(a for a in args if a is not type(None)), value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SvdExportError(f"manifest field {where} must be an object")
        hints = typing.get_type_hints(tp)
        out = {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                out[f.name] = _parse(hints[f.name], value[f.name], f"{where}.{f.name}".lstrip("."))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SvdExportError(f"manifest field {where}.{f.name} is missing".replace(" .", " "))
        return tp(**out)
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            raise SvdExportError(f"manifest field {where} has unknown value {value!r}") from None
    if origin is list:
        if not isinstance(value, list):
            raise SvdExportError(f"manifest field {where} must be a list")
        return [_parse(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise SvdExportError(f"manifest field {where} must be an object")
        return {k: _parse(args[1], v, f"{where}.{k}") for k, v in value.items()} if args else value
    want = {float: (int, float), int: (int,), str: (str,), bool: (bool,), dict: (dict,), list: (list,)}.get(tp)
    if want is not None and (not isinstance(value, want) or (tp is not bool and isinstance(value, bool))):
        raise SvdExportError(f"manifest field {where} must be {tp.__name__}, got {type(value).__name__}")
    return value


def library_versions() -> dict[str, str]:
    import diffusers
    import torch

    from svdexport import __version__

    return {"svdexport": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version()}


def _digest(data: dict) -> str:
    body = {k: v for k, v in data.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write(folder: Path, manifest: Manifest) -> Manifest:
    """Writes folder/manifest.json, adding the format, versions and every file's sha256."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest.format, manifest.versions = FORMAT, library_versions()
    manifest.files = {str(p.relative_to(folder)): sha256_file(p) for p in files}
    data = manifest.to_dict()
    manifest.manifest_sha256 = data["manifest_sha256"] = _digest(data)
    (folder / MANIFEST).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return manifest


def read(folder: Path, check_versions: bool = True, trusted_keys: list | None = None,
         hash_files: bool = True) -> Manifest:
    """The verified manifest of an engine folder; any mismatch raises SvdExportError naming it.

    With trusted keys (given, or SVDEXPORT_TRUSTED_KEYS) the manifest's bytes must carry a signature by one
    of them, checked before anything else is parsed or opened. `hash_files=False` only peeks (option checks
    before the work); a load always hashes."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise SvdExportError(f"engine folder not found: {folder}")
    if not path.exists():
        raise SvdExportError(f"{folder} is not an svdexport engine: {MANIFEST} is missing")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SvdExportError(f"{path} is unreadable: {e}") from None
    keys = trust.trusted_keys(trusted_keys)
    if keys:
        trust.verify(folder, raw, keys)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SvdExportError(f"{path} is unreadable: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SvdExportError(f"{path} is not an {FORMAT} manifest")
    if data.get("manifest_sha256") != _digest(data):
        raise SvdExportError(f"{path} was edited after the build (its digest does not match); rebuild the engine")
    manifest = _parse(Manifest, data, "")
    for name in manifest.files:
        manifest.path(folder, name)  # every listed file inside the folder, before any is opened
    cond = manifest.model.conditioning
    if cond.kind is ConditioningKind.CLASS_TABLE:
        manifest.path(folder, cond.file or "")
    for name, digest in manifest.files.items() if hash_files else ():
        f = folder / name
        if not f.is_file():
            raise SvdExportError(f"engine file {f} is missing")
        if sha256_file(f) != digest:
            raise SvdExportError(f"engine file {f} is corrupted (sha256 does not match the manifest)")
    if check_versions:
        now = library_versions()
        for lib in ("torch", "diffusers", "svdexport"):
            if manifest.versions.get(lib) != now[lib]:
                raise SvdExportError(f"engine {folder} was built with {lib} {manifest.versions.get(lib)}, this "
                                     f"environment has {now[lib]}; rebuild it")
    return manifest
