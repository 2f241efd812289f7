"""The weights a compiled engine binds at load: the referenced checkpoint files, found, verified and mapped, and
the engine's own constants file (build/bound.py writes both records).

A referenced file is taken from where the build saw it, or from `weights=` (`run --weights PATH`) when the
checkpoint has moved: a file, or a folder whose .safetensors files (also under transformer/) are matched to
the recorded ones by size and sha256. Every file is checked against its recorded sha256 before a byte of it is
used, and mapped through the very descriptor that was hashed (verified.py); a mismatch is one line, before
any work.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from svdexport.errors import SvdExportError
from svdexport.export.bindings import Bindings, resolve
from svdexport.tensorfile import MappedFile
from svdexport.verified import DigestMismatch, VerifiedFile


def candidates(weights: Path) -> list[Path]:
    """The safetensors files a `--weights` path offers: the file itself, or a folder's (and its transformer/'s)."""
    weights = Path(weights)
    if weights.is_file():
        return [weights]
    if weights.is_dir():
        return sorted({*weights.glob("*.safetensors"), *weights.glob("transformer/*.safetensors")})
    raise SvdExportError(f"--weights {weights}: no such file or folder")


def locate(referenced: list, weights: Path | None, signed: bool) -> list[VerifiedFile]:
    """Per referenced file (manifest ReferencedFile), that file open and verified against its recorded sha256:
    where the build saw it, or among `weights`' files the one of the same size and sha256. A signature-requiring
    load hashes every byte; another takes a digest this user's hash cache holds for the unchanged file."""
    found = []
    for r in referenced:
        if weights is None:
            if not Path(r.path).is_file():
                raise SvdExportError(f"this engine takes its weights from {r.path}, which is missing; give the "
                                     "checkpoint's new place with --weights PATH (load(..., weights=PATH))")
            paths = [Path(r.path)]
        else:
            paths = [p for p in candidates(weights) if p.stat().st_size == r.size]
        for p in paths:
            try:
                found.append(VerifiedFile(p, r.sha256, use_cache=not signed, what="weights file",
                                          against="the sha256 this engine was built from"))
                break
            except DigestMismatch:
                if len(paths) == 1:
                    raise
        else:
            where = f"--weights {weights}" if weights is not None else r.path
            raise SvdExportError(f"{where} holds no file with the sha256 of {Path(r.path).name} ({r.size} bytes, "
                                 f"sha256 {r.sha256[:16]}...), which this engine was built from")
    return found


def open_bound(manifest, folder: Path, weights: Path | None = None) -> "BoundConstants":
    """The bound weights of an engine whose manifest records them (`manifest.bound`): bindings and constants
    from the engine's verified files, referenced files located, verified and mapped through their descriptors."""
    bound = manifest.bound
    bindings = read_bindings(manifest.path(folder, bound.bindings))
    verified = locate(bound.referenced, Path(weights) if weights is not None else None, manifest.signed)
    try:  # mapped through the hashed descriptors; the mappings keep the files open after they are closed
        files = [MappedFile(v.path, fd=v.fd) for v in verified]
        own = MappedFile(manifest.path(folder, bound.constants))
        for v in verified:  # and nothing was written into them meanwhile
            v.check_unchanged()
    finally:
        for v in verified:
            v.close()
    return BoundConstants(bindings, files, own)


class BoundConstants:
    """`LoadSpec.constants`: per graph, its constants by FQN, views of the mapped files (cast where the graph's
    dtype differs, once per tensor); the mapped files stay alive as long as this object."""

    def __init__(self, bindings: Bindings, files: list[MappedFile], own: MappedFile):
        self.bindings, self.files, self.own = bindings, files, own
        self._own = own.tensors()
        self._cache: dict = {}

    def __call__(self, graph: str) -> dict[str, torch.Tensor]:
        return resolve(self.bindings, graph, self.files, self._own, self._cache)


def read_bindings(path: Path) -> Bindings:
    try:
        data = json.loads(Path(path).read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise SvdExportError(f"cannot read the engine's weight bindings {path}: {str(e)[:120]}") from None
    if not isinstance(data, dict):
        raise SvdExportError(f"the engine's weight bindings {path} are malformed")
    return Bindings.from_dict(data)
