"""Engine manifests: what was built, from what, with which libraries; hashes refuse corrupted engines.

The manifest lists the sha256 of every file in the engine folder and a digest of its own content
(`manifest_sha256`), so an edited manifest is refused as surely as an edited engine file.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

from svdexport.errors import SvdExportError
from svdexport.runtime.files import sha256_file

FORMAT = "svdexport.engine/1"
MANIFEST = "manifest.json"


def library_versions() -> dict[str, str]:
    import diffusers
    import torch

    from svdexport import __version__

    return {"svdexport": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version()}


def _digest(data: dict) -> str:
    body = {k: v for k, v in data.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write(folder: Path, data: dict) -> dict:
    """Writes folder/manifest.json over `data`, adding the format, versions and every file's sha256."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    data = {"format": FORMAT, **data, "versions": library_versions(),
            "files": {str(p.relative_to(folder)): sha256_file(p) for p in files}}
    data["manifest_sha256"] = _digest(data)
    (folder / MANIFEST).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data


def read(folder: Path, check_versions: bool = True) -> dict:
    """The verified manifest of an engine folder; any mismatch raises SvdExportError naming it."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise SvdExportError(f"engine folder not found: {folder}")
    if not path.exists():
        raise SvdExportError(f"{folder} is not an svdexport engine: {MANIFEST} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SvdExportError(f"{path} is unreadable: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SvdExportError(f"{path} is not an {FORMAT} manifest")
    if data.get("manifest_sha256") != _digest(data):
        raise SvdExportError(f"{path} was edited after the build (its digest does not match); rebuild the engine")
    for name, digest in data["files"].items():
        f = folder / name
        if not f.is_file():
            raise SvdExportError(f"engine file {f} is missing")
        if sha256_file(f) != digest:
            raise SvdExportError(f"engine file {f} is corrupted (sha256 does not match the manifest)")
    if check_versions:
        now = library_versions()
        built = data.get("versions", {})
        for lib in ("torch", "diffusers", "svdexport"):
            if built.get(lib) != now[lib]:
                raise SvdExportError(
                    f"engine {folder} was built with {lib} {built.get(lib)}, this environment has {now[lib]}; rebuild it"
                )
    return data
