"""Output paths checked before the work, and one writer per output at a time.

Every command that writes calls `check_file` / `check_dir` on all of its outputs before it starts: the
parent folder exists or can be created, the path is not inside an engine folder, and an existing file is
replaced only when svdexport wrote it (its marker, `media.written_by_svdexport`) or with `--force`.
Builds hold `output_lock` on their folders and remove what killed builds left (`files.remove_stale`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from svdexport.errors import SvdExportError
from svdexport.files import read_json, remove_stale
from svdexport.media import written_by_svdexport

MANIFEST = "manifest.json"  # what makes a folder an engine (or exported-graphs) folder


def manifest_digest(data: dict) -> str:
    """The digest an engine manifest records of its own content (every field but `manifest_sha256`)."""
    import hashlib
    import json

    body = {k: v for k, v in data.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
LOCK_WAIT_S = 2.0  # how long a second build into the same folder waits before it is refused


def _first_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def writable_parent(path: Path, option: str) -> None:
    """The folder that will hold `path` exists and is writable, or can be created (missing parents): tried, by
    creating and removing a temporary file beside `path` (and the missing parents, removed again), since
    permission bits say nothing of /sys, read-only mounts or names too long for the filesystem."""
    parent = Path(os.path.abspath(path)).parent
    base = _first_existing(parent)
    if not base.is_dir():
        raise SvdExportError(f"{option} {path}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise SvdExportError(f"{option} {path}: cannot write in {base} (permission denied)")
    created = []
    # The name remove_stale knows (.NAME.tmp-PID-...): a probe a killed run left is removed by the next.
    probe = parent / f".{Path(path).name}.tmp-{os.getpid()}-probe"
    try:
        for d in reversed([parent, *parent.parents][:len(parent.parts) - len(base.parts)]):
            d.mkdir()
            created.append(d)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise SvdExportError(f"{option} {path}: cannot write in {parent} ({e.strerror or e})") from None
    finally:
        for d in reversed(created):  # innermost first
            try:
                d.rmdir()
            except OSError:
                break


def engine_folder_of(path: Path) -> Path | None:
    """The engine folder (a folder with manifest.json) that `path` would be written inside, if any."""
    p = Path(os.path.abspath(path)).parent
    while True:
        if (p / MANIFEST).is_file():
            return p
        if p == p.parent:
            return None
        p = p.parent


def check_file(path: str | Path, option: str, force: bool = False) -> Path:
    """An output file: checked, with stale temporaries of killed runs beside it removed."""
    path = Path(path)
    writable_parent(path, option)  # first: a name too long for the filesystem fails every stat after it
    if path.is_dir():
        raise SvdExportError(f"{option} {path} is a folder; give a file path")
    engine = engine_folder_of(path)
    if engine is not None:
        raise SvdExportError(f"{option} {path} is inside the engine folder {engine}; write outputs elsewhere")
    if (path.exists() or path.is_symlink()) and not force and not written_by_svdexport(path):
        raise SvdExportError(f"{path} exists and was not written by svdexport; choose another path or pass --force")
    remove_stale(path)
    return path


def check_files(paths: list[tuple[str, Path | str | None]], force: bool = False) -> list[Path]:
    """Several outputs of one command: each checked, and no two the same file."""
    seen: dict[Path, str] = {}
    out = []
    for option, path in paths:
        if path is None:
            continue
        p = check_file(path, option, force)
        key = Path(os.path.realpath(p))  # one file through a symlinked folder, or a symlink to it, is one file
        if key in seen:
            raise SvdExportError(f"{option} and {seen[key]} name the same file {p}")
        seen[key] = option
        out.append(p)
    return out


def is_engine(folder: Path) -> bool:
    """A folder whose manifest.json is an engine's (an exported-graphs folder has one of another form)."""
    if not (Path(folder) / MANIFEST).is_file():
        return False
    try:
        data = read_json(Path(folder) / MANIFEST)
    except SvdExportError:  # unreadable, damaged, too deep: not an engine's
        return False
    return isinstance(data, dict) and str(data.get("format", "")).startswith("svdexport.engine")


def check_dir(path: str | Path, option: str, force: bool = False, engine_ok: bool = True) -> Path:
    """An output folder that replaces an earlier svdexport folder (one with manifest.json) or an empty one;
    `engine_ok=False` (the exported graphs) refuses to replace an engine."""
    path = Path(path)
    writable_parent(path, option)  # first: a name too long for the filesystem fails every stat after it
    if not engine_ok and is_engine(path):
        raise SvdExportError(f"{option} {path} is an engine folder; exported graphs go to a folder of their own")
    if path.exists() and not path.is_dir():
        raise SvdExportError(f"{option} {path} is a file, not a folder")
    engine = engine_folder_of(path)
    if engine is not None:
        raise SvdExportError(f"{option} {path} is inside the engine folder {engine}; write outputs elsewhere")
    if path.is_dir() and not force and any(path.iterdir()) and not (path / MANIFEST).is_file():
        raise SvdExportError(f"{path} exists and is not an svdexport output; choose another {option} or pass --force")
    remove_stale(path)
    return path


@contextmanager
def output_lock(target: Path, wait_s: float | None = None) -> Iterator[None]:
    """Holds `.NAME.lock` beside `target` for the duration: a second writer waits `wait_s`, then is refused.

    Parents this creates are removed again when nothing was written into them."""
    from filelock import FileLock, Timeout

    target = Path(target)
    created = []
    p = target.parent
    while not p.exists():
        created.append(p)
        p = p.parent
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / f".{target.name}.lock"
    lock = FileLock(str(path), timeout=LOCK_WAIT_S if wait_s is None else wait_s)
    try:
        lock.acquire()
    except Timeout:
        raise SvdExportError(f"another svdexport command is writing {target} (it holds {path}); wait for it to "
                             "finish or choose another output") from None
    try:
        yield
    finally:
        # Unlinked while still held: a waiter that locked the old file sees it unlinked and retries.
        path.unlink(missing_ok=True)
        lock.release()
        for d in created:  # innermost first
            try:
                d.rmdir()
            except OSError:
                break
