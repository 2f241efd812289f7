"""The engine manifest: the one place that knows the on-disk format of an engine folder.

`manifest.json` records what was built, from what, with which libraries, and the sha256 of every file in
the folder plus a digest of its own content (`manifest_sha256`), so an edited manifest is refused as
surely as an edited engine file. On read it is verified, then parsed into typed dataclasses; a missing
or mistyped field, or a value no run could use (runtime/fields.py), is refused in one line naming it.
Engines of svdexport 0.2 have the same layout.

The digest catches accidents, not an attacker (anyone can recompute it): an engine is code, and only a
signature (`runtime/trust.py`) by a trusted key makes an engine from elsewhere safe to load. Every name in
`files` is a plain relative path that resolves inside the folder, and backends open files only through
`Manifest.path`, which refuses names the manifest does not list.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from svdexport.cache.config import CacheConfig
from svdexport.errors import SvdExportError, clip
from svdexport.export import GraphSpec, LoadSpec
from svdexport.files import confined, parse_json, sha256_file
from svdexport.models.ranges import ShapeRange, static
from svdexport.models.sparse_attention import AttentionRecord
from svdexport.outputs import MANIFEST, manifest_digest  # one name for the file, here and in outputs and trust
from svdexport.runtime import fields, trust
from svdexport.verified import VerifiedSet

FORMAT = "svdexport.engine/1"
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
    # class-table: class names, in table order
    labels: list[str] | None = field(default=None, metadata={"max_chars": fields.NAME_MAX})
    # pipeline: the prompts the bases were calibrated on
    calibration_prompts: list[str] | None = field(default=None, metadata={"max_chars": fields.PROMPT_MAX})


@dataclass
class WeightsRecord:
    source: str  # "bundled:NAME" or the absolute path the engine was built from
    sha256: str  # digest of the weight files (or of the generated state dict)
    files: list  # [name, size, mtime_ns] per file: informational (a load checks sha256, see WeightsInfo.verify)


@dataclass
class ModelRecord:
    family: str  # registry name of the DiT family
    config: dict  # the transformer's diffusers config
    weights: WeightsRecord
    pipeline_parts: list[str]  # pipeline folders found beside the transformer
    conditioning: Conditioning


@dataclass
class SiteRecord:
    name: str = field(metadata={"max_chars": fields.NAME_MAX})
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


@dataclass
class ReferencedFile:
    """A checkpoint file a compiled engine takes its weights from, outside the engine folder."""

    path: str  # absolute path at build time (`run --weights` / `load(weights=)` point elsewhere)
    sha256: str
    size: int


@dataclass
class BoundWeights:
    """A compiled engine whose graphs take their weights at load (build/bound.py, export/bindings.py)."""

    referenced: list[ReferencedFile]  # checkpoint files referenced (none: every weight is in `constants`)
    bindings: str  # engine file: per graph constant, its file and byte range, or its key in `constants`
    constants: str  # engine file: the weights the engine keeps itself
    referenced_bytes: int  # bytes the graphs take from the referenced files
    embedded_bytes: int  # bytes of `constants`


class EngineKind(str, Enum):
    STATIC = "static"  # one shape per engine: the build shapes
    RANGED = "ranged"  # every shape between shapes.min and shapes.max (issue 15)


@dataclass
class ShapesRecord:
    build: dict[str, int]  # the family's build shapes (batch, height, width, text_len, ...); a ranged engine's optimum
    inputs: dict[str, list[int]]  # graph input shapes at the build shapes (a static engine's only ones)
    kind: EngineKind = EngineKind.STATIC  # engines from before issue 15 have no kind: static
    min: dict[str, int] | None = None  # ranged: the smallest shapes served (same axes as build)
    max: dict[str, int] | None = None  # ranged: the largest

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
    bound: BoundWeights | None = None  # compiled backends: weights bound at load (None: eager, in the graphs)
    attention: AttentionRecord | None = None  # --attention sparse: the layout (None: dense, not written)
    format: str = FORMAT
    versions: dict = field(default_factory=dict)  # library versions at build time
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256, every file but this one
    manifest_sha256: str = ""

    # Set by `read` for a load; not part of the format (no annotation: not dataclass fields). `opened`: the
    # listed files, open and hashed (a verified.VerifiedSet), which `path` names; `signed`: a signature by a
    # trusted key was checked (the weights are then hashed in full, never taken from a cache).
    opened = None
    signed = False

    def path(self, folder: Path, name: str) -> Path:
        """A path for a file this manifest lists; anything else is refused. After a load's `read`, the path
        reaches the very bytes that were hashed (verified.VerifiedSet), whatever is renamed over the file
        since; a peek's (hash_files=False) is folder/name."""
        path = confined(folder, name, self.files)
        return path if self.opened is None else self.opened.path(name)

    def load_spec(self, eager_graphs=None, folder: Path | None = None) -> LoadSpec:
        resolve = None if folder is None else (lambda name: self.path(folder, name))
        unchanged = None if self.opened is None else self.opened.check_unchanged
        return LoadSpec(self.graphs, self.dtype, self.device, eager_graphs, resolve, self.backend_options,
                        ranged=self.shapes.kind is EngineKind.RANGED, unchanged=unchanged)

    def to_dict(self) -> dict:
        data = _plain(dataclasses.asdict(self))
        cond = data["model"]["conditioning"]  # only the fields of its kind, as 0.2 wrote them
        data["model"]["conditioning"] = {k: v for k, v in cond.items() if v is not None}
        # Issue 15's fields only where they say something: a static engine's manifest records just its kind.
        data["shapes"] = {k: v for k, v in data["shapes"].items() if v is not None}
        for k in ("shapes", "plan_steps"):  # options that, unused, leave the manifest as it was before them
            if not data["calibration"][k]:
                del data["calibration"][k]
        if data["attention"] is None:  # a dense engine's manifest is what it was before the option
            del data["attention"]
        return data


def _plain(x):
    if isinstance(x, Enum):
        return x.value
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def _parse(tp, value, where: str, limit: int = fields.TEXT_MAX):
    """`value` (parsed JSON) as type `tp`, recursively; a mismatch raises naming the field. Strings are checked
    (`fields.text`, at most `limit` characters), untyped values scanned, and each record's values checked
    (`_CHECKS`), so that nothing a forged manifest holds fails later with a traceback."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _parse(next(a for a in args if a is not type(None)), value, where, limit)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SvdExportError(f"manifest field {where} must be an object")
        hints = typing.get_type_hints(tp)
        out = {}
        for f in dataclasses.fields(tp):
            # A field renamed since its engines were built is read under its former name (`formerly`).
            key = f.name if f.name in value else f.metadata.get("formerly", f.name)
            if key in value:
                out[f.name] = _parse(hints[f.name], value[key], f"{where}.{key}".lstrip("."),
                                     f.metadata.get("max_chars", fields.TEXT_MAX))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SvdExportError(f"manifest field {where}.{f.name} is missing".replace(" .", " "))
        record = tp(**out)
        if tp in _CHECKS:
            _CHECKS[tp](record, where)
        return record
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except (ValueError, TypeError):
            raise SvdExportError(f"manifest field {where} has unknown value {clip(repr(value))}") from None
    if origin is list:
        if not isinstance(value, list):
            raise SvdExportError(f"manifest field {where} must be a list")
        return [_parse(args[0], v, f"{where}[{i}]", limit) for i, v in enumerate(value)] if args else \
            fields.scan(value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise SvdExportError(f"manifest field {where} must be an object")
        if not args:
            return fields.scan(value, where)
        return {fields.text(k, f"{where} (a key)"): _parse(args[1], v, f"{where}.{k}", limit) for k, v in value.items()}
    want = {float: (int, float), int: (int,), str: (str,), bool: (bool,), dict: (dict,), list: (list,)}.get(tp)
    if want is not None and (not isinstance(value, want) or (tp is not bool and isinstance(value, bool))):
        raise SvdExportError(f"manifest field {where} must be {tp.__name__}, got {type(value).__name__}")
    if isinstance(value, str):
        return fields.text(value, where, limit)
    if isinstance(value, int) and not isinstance(value, bool):
        return fields.integer(value, where)
    return fields.scan(value, where) if isinstance(value, (dict, list)) else value


# Each record's values beyond their JSON types (runtime/fields.py), checked as `_parse` makes the record.
_CHECKS = {Manifest: fields.manifest, ShapesRecord: fields.shapes, GraphSpec: fields.graph, PlanRecord: fields.plan,
           CalibrationRecord: fields.calibration, CacheConfig: fields.cache}


def library_versions() -> dict[str, str]:
    import diffusers
    import torch

    from svdexport.version import __version__

    return {"svdexport": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version()}


_digest = manifest_digest  # (tests forge manifests through this name)


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
         hash_files: bool = True, signature: bool = True) -> Manifest:
    """The verified manifest of an engine folder; any mismatch raises SvdExportError naming it.

    With trusted keys (trust.trusted_keys: given, or SVDEXPORT_TRUSTED_KEYS) the manifest's bytes must carry
    a signature by one of them, checked before anything else is parsed or opened; `signature=False` checks
    none (signing an engine: nothing in it runs). `hash_files=False` only peeks (option checks before the
    work); a load hashes every listed file through a descriptor it keeps open (`Manifest.opened`, released
    by Engine.close), so that what the backends load is what was hashed."""
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
    keys = trust.trusted_keys(trusted_keys) if signature else []
    if keys:
        trust.verify(folder, raw, keys)
    data = parse_json(raw, path)  # not UTF-8, malformed, too deep, a huge integer: one line
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
    if check_versions:
        now = library_versions()
        for lib in ("torch", "diffusers", "svdexport"):
            if manifest.versions.get(lib) != now[lib]:
                raise SvdExportError(f"engine {folder} was built with {lib} {manifest.versions.get(lib)}, this "
                                     f"environment has {now[lib]}; rebuild it")
    if hash_files:  # engine files are hashed in full on every load (no cache: a cache would hide bit rot)
        manifest.opened = VerifiedSet(folder, manifest.files, what="engine file", against="the manifest")
    manifest.signed = bool(keys)
    return manifest
