"""Weights handling every diffusers-transformer family shares: what the weights are (`WeightsInfo`),
bundled models, diffusers folders, configs, loading that refuses mismatches, parameter counts, class
tables and prompt files.

A family passes its transformer class and its own names; what differs between families (single-file
checkpoints and their key layouts, text encoders) stays with the family.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from svdexport.errors import SvdExportError
from svdexport.files import fingerprint
from svdexport.models.mapped import config_kwargs, load_mapped
from svdexport.verified import VerifiedFile, sha256_of

CALIBRATION_PROMPTS = Path(__file__).parent / "prompts" / "calibration.txt"


@dataclass
class WeightsInfo:
    """What a build knows of the weights before loading a tensor, and how a manifest identifies them."""

    source: str  # "bundled:NAME" or the absolute path given with --weights
    config: dict  # the transformer's diffusers config
    files: list[str] = field(default_factory=list)  # weight files read, absolute paths, in hashing order
    pipeline_parts: list[str] = field(default_factory=list)  # text encoders / VAE found beside the transformer
    sha256: str = ""  # digest of the weight files (a bundled random spec's: of its cached checkpoint), on demand
    conditioning: dict = field(default_factory=lambda: {"kind": "synthetic"})  # or a class table (file, labels)
    shapes: dict | None = None  # default build shapes the model declares (bundled models)
    precision: dict | None = None  # {"dtype", "why"}: the precision the model declares for --dtype auto
    content_hashed: bool = False  # sha256 is a hash of every byte now, none taken from verified.HashCache

    def digest(self) -> str:
        """The digest of the weight files (name and content, in order), taken from this user's cache of verified
        hashes for files unchanged since (device, inode, size, mtime, ctime: verified.HashCache)."""
        if not self.sha256:
            self.sha256 = sha256_of([Path(f) for f in self.files], use_cache=True, what="weight file")
        return self.sha256

    def record(self) -> dict:
        """What a manifest keeps to check later that the same weights are loaded: the digest. `files` (name,
        size, mtime per file) is informational now; svdexport 0.3.0 skipped hashing when it matched."""
        return {"source": self.source, "sha256": self.digest(),
                "files": fingerprint([Path(f) for f in self.files])}

    def verify(self, recorded: dict, content: bool = True) -> None:
        """Refuses weights that differ from the build's. `content` (a signed load): every byte is hashed now;
        else a file unchanged since this user hashed it (same device, inode, size, mtime and ctime, which no
        user can set back) is taken from the cache, so that changed bytes are hashed whatever their mtime."""
        if self.files and content and not self.content_hashed:
            self.sha256 = sha256_of([Path(f) for f in self.files], use_cache=False, what="weight file")
            self.content_hashed = True
        if self.digest() != recorded.get("sha256"):
            raise SvdExportError(f"weights at {self.source} differ from the ones this engine was built from; rebuild it")

    def verify_loaded(self, recorded: dict, mapped: list, content: bool = True) -> None:
        """`verify` for weights already mapped (tensorfile.MappedFile): a mapped file's digest is of the bytes
        the model reads (or, unsigned, the cached digest of that very file: its device, inode and times, taken
        from the descriptor that was mapped), so a file renamed over after a check cannot slip in."""
        by_path = {str(Path(m.path).resolve()): m for m in mapped}
        h = hashlib.sha256()
        for f in self.files:
            m = by_path.get(str(Path(f).resolve()))
            if m is not None:
                digest = m.digest(use_cache=not content)
            else:
                opened = VerifiedFile(Path(f), use_cache=not content, what="weight file")
                digest = opened.sha256
                opened.close()
            h.update(Path(f).name.encode())
            h.update(bytes.fromhex(digest))
        if h.hexdigest() != recorded.get("sha256"):
            raise SvdExportError(f"weights at {self.source} differ from the ones this engine was built from; rebuild it")


def from_pretrained(cls, path, dtype: torch.dtype, **kwargs):
    """`cls.from_pretrained` offline in `dtype`. Newer diffusers renamed torch_dtype to dtype and warn about
    the old name, which every supported version still takes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
        return cls.from_pretrained(path, torch_dtype=dtype, local_files_only=True, **kwargs)


def load_table(path: str | Path) -> dict[str, torch.Tensor]:
    """A class-conditioning table: per class, the conditioning tensors the transformer takes."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for damaged files
        raise SvdExportError(f"cannot read the class table {path}: {str(e).splitlines()[0]}") from None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SvdExportError(f"malformed config {path}: {e}") from None


def check_class(config: dict, where: Path, class_name: str) -> None:
    cls = config.get("_class_name", class_name)
    if cls != class_name:
        raise SvdExportError(f"{where} holds a {cls}, not a {class_name}")


def inspect_folder(root: Path, class_name: str, parts: tuple[str, ...]) -> WeightsInfo:
    """A diffusers folder: the pipeline's root (with transformer/) or the transformer folder itself."""
    folder = root / "transformer" if (root / "transformer" / "config.json").exists() else root
    if not (folder / "config.json").exists():
        raise SvdExportError(f"{root} has no transformer (expected config.json or transformer/config.json)")
    config = read_json(folder / "config.json")
    check_class(config, folder / "config.json", class_name)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SvdExportError(f"{folder} has no .safetensors weights")
    present = [p for p in parts if (root / p).is_dir()]
    info = WeightsInfo(str(root.resolve()), config_kwargs(config), [str(f.resolve()) for f in files], present)
    meta_path = root / "svdexport.json"  # written by the project's training scripts beside their models
    if meta_path.exists():
        meta = read_json(meta_path)
        cond = meta.get("conditioning", {})
        if cond.get("kind") == "class-table":
            table = root / cond["file"]
            info.conditioning = {"kind": "class-table", "file": str(table.resolve()), "labels": cond["labels"]}
            info.files.append(str(table.resolve()))  # the table is part of the model's identity
        info.shapes = meta.get("shapes")
        info.precision = meta.get("precision")
    return info


def inspect_bundled(weights: str, bundled: dict[str, Path], class_name: str) -> WeightsInfo:
    """`bundled:NAME`: a committed diffusers folder, or a JSON spec of seeded random weights."""
    name = weights.split(":", 1)[1]
    if name not in bundled:
        raise SvdExportError(f"unknown bundled model {name!r} (choose from {', '.join(bundled)})")
    if bundled[name].is_dir():
        info = inspect_folder(bundled[name], class_name, ())
    else:
        spec = json.loads(bundled[name].read_text())
        info = WeightsInfo(weights, spec["config"], shapes=spec.get("shapes"), precision=spec.get("precision"))
        info.conditioning = spec.get("conditioning", info.conditioning)
    info.source = weights
    return info


def inspect_weights(weights: str | None, default: str, bundled: dict[str, Path], class_name: str,
                    parts: tuple[str, ...]) -> WeightsInfo | Path:
    """`--weights` resolved: bundled and folder weights inspected; a single file returned as its Path for
    the family to read (single-file layouts are family-specific)."""
    weights = default if weights in (None, "bundled") else weights
    if weights.startswith("bundled:"):
        return inspect_bundled(weights, bundled, class_name)
    path = Path(weights)
    if not path.exists():
        raise SvdExportError(f"weights not found: {path}")
    return inspect_folder(path, class_name, parts) if path.is_dir() else path


def inspect_file(path: Path, cls, infer_config) -> WeightsInfo:
    """A single .safetensors transformer of diffusers class `cls`: its config from config.json beside it, else
    `infer_config()` (the family reads it from the tensor shapes of its layouts)."""
    if path.suffix != ".safetensors":
        raise SvdExportError(f"weights must be a diffusers folder or a .safetensors file, got {path}")
    beside = path.parent / "config.json"
    if beside.exists():
        config = read_json(beside)
        check_class(config, beside, cls.__name__)
        config = config_kwargs(config)
    else:
        config = infer_config()
    try:
        with torch.device("meta"):  # fills in the class defaults (e.g. axes_dims_rope) without allocating
            config = dict(cls.from_config(config).config)
    except TypeError as e:
        raise SvdExportError(f"bad transformer config for {path}: {e}") from None
    return WeightsInfo(str(path.resolve()), config_kwargs(config), [str(path.resolve())])


def cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    # nn.Module.to itself: ModelMixin.to warns about float32-only modules, which these models do not have.
    return nn.Module.to(model, dtype)


def weight_files(info: WeightsInfo) -> list[str]:
    """The transformer's safetensors files among `info.files` (which also name a class table, if any)."""
    table = info.conditioning.get("file")
    return [f for f in info.files if f.endswith(".safetensors") and f != table]


def load_folder(cls, info: WeightsInfo, dtype: torch.dtype):
    """A diffusers folder's transformer, its weights views of the mapped shard files (models/mapped.py)."""
    files = weight_files(info)
    loaded = load_mapped(cls, info.config, files, dtype, str(Path(files[0]).parent))
    info.config = dict(loaded.model.config)
    return loaded


def count_parameters(cls, config: dict) -> int:
    """Parameters of the transformer a config describes, counted on the meta device (nothing allocated);
    from_config, as from_pretrained, ignores keys the installed class does not know."""
    with torch.device("meta"):
        return sum(p.numel() for p in cls.from_config(config_kwargs(config)).parameters())


def read_prompts(path: str | Path | None) -> list[str]:
    """Prompts of a text file, one per line (blank lines and # comments skipped); the built-in list for None."""
    path = Path(path) if path else CALIBRATION_PROMPTS
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SvdExportError(f"cannot read prompts from {path}: {e}") from None
    prompts = [p.strip() for p in lines if p.strip() and not p.lstrip().startswith("#")]
    if not prompts:
        raise SvdExportError(f"{path} has no prompts (one per line)")
    return prompts
