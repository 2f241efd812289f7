"""Hashes, fingerprints, atomic outputs, stale temporaries, scratch folders and paths confined to a folder."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from tqdm import tqdm

if TYPE_CHECKING:  # annotations only: importing files (keygen, sign) must not import torch
    import torch

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


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors.torch.save_file with its metadata in sorted order, so that the same tensors and metadata
    give the same bytes (and the same sha256 in a manifest): safetensors 0.8 writes metadata in hash-map
    order, different on every run (safetensors issue #584). The header is the library's own JSON,
    re-serialized with sorted keys to the same length, the length the format records."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    canonical = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(canonical) <= size:  # padded with spaces, as the format allows; else keep the library's bytes
        data = data[:8] + canonical.ljust(size) + data[8 + size:]
    Path(path).write_bytes(data)


def fingerprint(paths: list[Path]) -> list[list]:
    """(name, size, mtime_ns) per file: what a manifest's weights record lists (informational: anyone who
    can write a file can restore its mtime, so nothing is skipped on it; see verified.HashCache)."""
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def check_replaceable(target: Path, force: bool = False) -> None:
    """A build may replace an earlier engine (a folder with manifest.json), never the user's other files
    (a folder, with --force)."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or (not force and any(target.iterdir())
                                                    and not (target / "manifest.json").exists())):
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


_RENAME_EXCHANGE = 2  # linux/fs.h


def exchange(a: Path, b: Path) -> bool:
    """Swaps two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the kernel, the C
    library or the filesystem cannot, having changed nothing."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _replace_dir(tmp: Path, target: Path) -> None:
    """`tmp` becomes `target` with no moment where `target` is missing: an exchange, then the old folder (now
    at `tmp`) removed. Without one, two renames through `.NAME.old-PID`, which `remove_stale` restores when a
    kill left `target` missing."""
    if target.exists() and exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target`, on failure it vanishes.

    Refuses to replace a non-empty folder that svdexport did not write (see `check_replaceable`).
    """
    target = Path(target)
    check_replaceable(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The pid in the name lets a later build tell a dead build's leftovers from a running one's.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
        for f in tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~_umask())
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a zombie or another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(target: Path) -> list[Path]:
    """Removes what a killed svdexport left beside `target`: `.NAME.tmp-PID*` (atomic_file, atomic_dir) and
    `.NAME.old-PID` folders whose process is gone. Returns what was removed. A build killed between its two
    renames (atomic_dir without an exchange) left `target` missing and the previous output (a folder with
    manifest.json) at `.NAME.old-PID`: that folder is put back as `target`, not removed."""
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)(-.*)?$")
    removed = []
    if not target.parent.is_dir():
        return removed
    stale = {p: m.group(1) for p in target.parent.iterdir() if (m := pattern.match(p.name))
             and int(m.group(2)) != os.getpid() and not pid_alive(int(m.group(2)))}
    olds = [p for p, kind in stale.items() if kind == "old" and not p.is_symlink() and (p / "manifest.json").is_file()]
    if olds and not os.path.lexists(target):
        newest = max(olds, key=lambda p: p.stat().st_mtime_ns)
        newest.rename(target)
        del stale[newest]
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


class Scratch:
    """A private temporary folder (`svdexport-KIND-PID-*` in the system temporary folder) that is removed by
    `remove()`, when nothing references it any more, or when the process exits; folders of dead processes
    are removed when the next one is made."""

    def __init__(self, kind: str):
        root = Path(tempfile.gettempdir())
        for p in root.glob(f"svdexport-{kind}-*"):
            m = re.match(rf"svdexport-{re.escape(kind)}-(\d+)-", p.name)
            if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
        self.path = Path(tempfile.mkdtemp(prefix=f"svdexport-{kind}-{os.getpid()}-", dir=root))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)

    def remove(self) -> None:
        self._finalizer()

    @contextmanager
    def as_tmpdir(self) -> Iterator[Path]:
        """Makes this folder the process's temporary folder for Python and native code (TMPDIR) meanwhile."""
        old_env, old_py = os.environ.get("TMPDIR"), tempfile.tempdir
        os.environ["TMPDIR"], tempfile.tempdir = str(self.path), str(self.path)
        try:
            yield self.path
        finally:
            tempfile.tempdir = old_py
            if old_env is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = old_env


def confined(folder: Path, name: str, listed) -> Path:
    """`folder/name` for a relative name the manifest lists (`listed`), refusing before anything is read an
    absolute path, `..`, a name not listed, and a path (or symlink) that resolves outside `folder`."""
    from svdexport.errors import SvdExportError

    folder = Path(folder)
    if not isinstance(name, str) or not name or Path(name).is_absolute() or "\\" in name \
            or any(part in ("..", "") for part in name.split("/")):
        raise SvdExportError(f"engine {folder} names the file {name!r}, which is not a plain relative path inside it")
    if name not in listed:
        raise SvdExportError(f"engine {folder} loads {name!r}, which its manifest does not list and hash")
    path = folder / name
    root = folder.resolve()
    if not path.resolve().is_relative_to(root):
        raise SvdExportError(f"engine file {path} resolves outside the engine folder ({path.resolve()})")
    return path


JSON_DEPTH = 64  # nesting levels a JSON file svdexport reads may have


def parse_json(data: bytes | str, what: object) -> object:
    """JSON text (bytes: UTF-8) parsed, or SvdExportError in one line naming `what`: text that is not UTF-8,
    malformed JSON, nesting deeper than Python's parser recurses (RecursionError) or an integer too long to
    convert (ValueError). Every JSON file svdexport reads goes through here or `read_json`."""
    from svdexport.errors import SvdExportError

    try:
        value = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except RecursionError:
        raise SvdExportError(f"{what} is unreadable: its JSON is nested too deeply") from None
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise SvdExportError(f"{what} is unreadable: {str(e).splitlines()[0][:200]}") from None
    # Nesting the parser took may still be too deep for the recursive code that walks the value (json.dumps
    # of a manifest's digest): svdexport's own files nest a few levels.
    level = [(value, 1)]
    while level:
        x, depth = level.pop()
        if depth > JSON_DEPTH:
            raise SvdExportError(f"{what} is unreadable: its JSON is nested deeper than {JSON_DEPTH} levels")
        level += [(v, depth + 1) for v in (x.values() if isinstance(x, dict) else x if isinstance(x, list) else ())]
    return value


def read_json(path: Path, what: object = None) -> object:
    """`parse_json` of a file; a file that cannot be read is refused in one line too."""
    from svdexport.errors import SvdExportError

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SvdExportError(f"cannot read {path}: {e.strerror or e}") from None
    return parse_json(data, what or path)
