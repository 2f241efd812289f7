"""Hashes, fingerprints and atomic output folders."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

_CHUNK = 1 << 22


def sha256_file(path: Path, progress: bool = False) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    # A bar only where hashing takes noticeable time (real checkpoints are tens of GB).
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}",
                                      disable=not progress or size < (1 << 30), leave=False) as bar:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def sha256_files(paths: list[Path], progress: bool = False) -> str:
    """One digest over several files (name and content), in the given order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(bytes.fromhex(sha256_file(p, progress)))
    return h.hexdigest()


def sha256_state_dict(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint(paths: list[Path]) -> list[list]:
    """(name, size, mtime_ns) per file: lets a later load skip re-hashing unchanged multi-GB weights."""
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def check_replaceable(target: Path) -> None:
    """A build may replace an earlier engine (a folder with manifest.json), never the user's other files."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / "manifest.json").exists())):
        from svdexport.errors import SvdExportError

        raise SvdExportError(f"{target} exists and is not an svdexport output; choose another --out or remove it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it becomes `target`, on failure it vanishes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # some writers create 0600 files; outputs follow the umask
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target`, on failure it vanishes.

    Refuses to replace a non-empty folder that svdexport did not write (see `check_replaceable`).
    """
    target = Path(target)
    check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
        for f in tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~_umask())
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
