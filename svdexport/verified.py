"""Files loaded as they were checked: each is opened once, hashed through that descriptor, and handed to
loaders by a name that reaches the very open file (`/proc/self/fd/N`, Linux), so that a file renamed over
the checked one after the check is never read.

- `VerifiedFile`: one file, opened read-only, hashed through its descriptor and compared with the expected
  sha256. `check_unchanged` refuses a file written in place since it was opened (its size, mtime or ctime
  changed: anyone who can write it can restore its mtime, nobody but the kernel sets its ctime; a ctime
  moved by a new link count alone, the file renamed over or removed, is checked by hashing it again).
- `VerifiedSet`: the verified files of one folder, and a private scratch folder that mirrors their names
  with links to the open files, for loaders that want a name (an AOTInductor package must end in .pt2).
- `HashCache`: sha256 of files this user hashed before, by device, inode, size, mtime and ctime. It may
  spare an unsigned load the hashing of unchanged multi-GB weights; a signature-requiring load never uses
  it, it hashes the content.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import weakref
from pathlib import Path

from tqdm import tqdm

from svdexport.errors import SvdExportError
from svdexport.files import Scratch, confined, remove_stale

_CHUNK = 1 << 22
_PROC_FD = Path("/proc/self/fd")


class DigestMismatch(SvdExportError):
    """A file's sha256 is not the expected one."""


def _key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


class HashCache:
    """`$XDG_CACHE_HOME/svdexport/verified-hashes.json` (default ~/.cache), mode 0600, written atomically; a
    missing, damaged or foreign (not this user's, or writable by others) cache is an empty one."""

    LIMIT = 4096  # entries kept, the most recent

    def __init__(self, path: Path | None = None):
        if path is None:
            base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            path = Path(base) / "svdexport" / "verified-hashes.json"
        self.path = Path(path) if Path(path).is_absolute() else None  # no home: no cache

    def _entries(self) -> dict[str, str]:
        if self.path is None:
            return {}
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return {}
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022 \
                    or st.st_size > (16 << 20):
                return {}
            data = json.loads(os.pread(fd, st.st_size, 0))
        except (OSError, ValueError, RecursionError):
            return {}
        finally:
            os.close(fd)
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, str) and len(v) == 64}

    def get(self, st: os.stat_result) -> str | None:
        return self._entries().get(_key(st))

    def put(self, st: os.stat_result, digest: str) -> None:
        """Records a hash; a cache that cannot be written is skipped (it only saves time)."""
        if self.path is None:
            return
        entries = self._entries()
        entries.pop(_key(st), None)
        entries[_key(st)] = digest
        entries = dict(list(entries.items())[-self.LIMIT:])
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            remove_stale(self.path)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f)
            os.replace(tmp, self.path)
        except OSError:
            pass
        finally:
            tmp.unlink(missing_ok=True)


class VerifiedFile:
    """`path` opened read-only and hashed through the open descriptor; `link` names that open file.

    `sha256`: the expected digest (None: only computed). `within`: the real folder the opened file must lie
    in (a symlink swapped in after an earlier check is caught here). `follow_symlinks=False` refuses a path
    that is itself a symlink. `use_cache`: take the digest from `HashCache` when this user hashed the same
    file (device, inode, size, mtime, ctime) before; never for a signature-requiring load."""

    def __init__(self, path: Path, sha256: str | None = None, *, within: Path | None = None,
                 follow_symlinks: bool = True, use_cache: bool = False, progress: bool = True,
                 what: str = "file", against: str = "its recorded sha256"):
        self.path, self.what = Path(path), what
        # O_NONBLOCK: a FIFO put in a file's place must not hang the open (it is refused below).
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            raise SvdExportError(f"{what} {self.path} is missing") from None
        except OSError as e:
            if not follow_symlinks and self.path.is_symlink():
                raise SvdExportError(f"{what} {self.path} is a symlink, which is refused here") from None
            raise SvdExportError(f"{what} {self.path} is unreadable: {e.strerror}") from None
        self.fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)
        try:
            self.stat = os.fstat(fd)
            if not stat.S_ISREG(self.stat.st_mode):
                raise SvdExportError(f"{what} {self.path} is not a regular file")
            if within is not None:
                self._check_within(Path(within))
            cache = HashCache() if use_cache else None
            cached = cache.get(self.stat) if cache else None
            if cached is not None and sha256 in (None, cached):
                self.sha256 = cached
            else:  # a refusal always rests on a hash of the content, never on the cache
                self.sha256 = self._hash(progress)
                if cache is not None:
                    cache.put(self.stat, self.sha256)
            if sha256 is not None and self.sha256 != sha256:
                raise DigestMismatch(f"{what} {self.path} is corrupted (sha256 does not match {against})")
        except BaseException:
            self.close()
            raise

    @property
    def link(self) -> Path:
        """A path that opens this very file (Linux's /proc/self/fd), whatever is renamed over `path`."""
        return _PROC_FD / str(self.fd)

    def _check_within(self, root: Path) -> None:
        try:
            real = Path(os.readlink(self.link))
        except OSError:
            return  # no /proc: `files.confined` checked the path before it was opened
        if not real.is_relative_to(root.resolve()):
            raise SvdExportError(f"{self.what} {self.path} resolves outside the engine folder ({real})")

    def _hash(self, progress: bool) -> str:
        h, offset = hashlib.sha256(), 0
        # A bar only where hashing takes noticeable time (real checkpoints are tens of GB).
        with tqdm(total=self.stat.st_size, unit="B", unit_scale=True, desc=f"sha256 {self.path.name}",
                  disable=not progress or self.stat.st_size < (1 << 30), leave=False) as bar:
            while chunk := os.pread(self.fd, _CHUNK, offset):
                h.update(chunk)
                offset += len(chunk)
                bar.update(len(chunk))
        return h.hexdigest()

    def check_unchanged(self) -> None:
        """Refuses a file written in place since it was opened (what a loader read may not be what was hashed).
        Linux's coarse timestamps: a write in the same clock tick as the open may leave both times as they
        were on kernels before 6.13 (no multigrain timestamps)."""
        now, then = os.fstat(self.fd), self.stat
        same = (now.st_size, now.st_mtime_ns) == (then.st_size, then.st_mtime_ns)
        if same and now.st_ctime_ns == then.st_ctime_ns:
            return
        # A new link count moves the ctime too (the file renamed over or removed: a rebuild meanwhile, or a
        # swap this very descriptor defeats); then the bytes must still hash to what was verified.
        if same and now.st_nlink != then.st_nlink and self._hash(progress=True) == self.sha256:
            self.stat = now
            return
        raise SvdExportError(f"{self.what} {self.path} was changed while it was loaded; load it again")

    def close(self) -> None:
        self._finalizer()


def hash_bytes(data, name: str, progress: bool = True) -> str:
    """sha256 of a buffer (a mapped file), with a bar where that takes noticeable time."""
    h, view = hashlib.sha256(), memoryview(data)
    with tqdm(total=len(view), unit="B", unit_scale=True, desc=f"sha256 {name}",
              disable=not progress or len(view) < (1 << 30), leave=False) as bar:
        for start in range(0, len(view), _CHUNK):
            h.update(view[start:start + _CHUNK])
            bar.update(min(_CHUNK, len(view) - start))
    return h.hexdigest()


def sha256_of(paths: list[Path], use_cache: bool = False, progress: bool = True, what: str = "file") -> str:
    """One digest over several files (name and content), in the given order; each file's hash from this
    user's HashCache where `use_cache` and the file is unchanged since."""
    h = hashlib.sha256()
    for p in paths:
        f = VerifiedFile(p, use_cache=use_cache, progress=progress, what=what)
        f.close()
        h.update(Path(p).name.encode())
        h.update(bytes.fromhex(f.sha256))
    return h.hexdigest()


class VerifiedPath(type(Path())):
    """A path in a VerifiedSet's private mirror (what loaders open); `origin` is the file's own path, for
    messages."""

    origin: Path


class VerifiedSet:
    """The files `digests` names (relative name -> sha256) in `folder`, each open and verified; `path(name)`
    names the open file under its own name, in a private folder that mirrors the folder's layout. Lives until
    `close()` or until it is garbage-collected."""

    def __init__(self, folder: Path, digests: dict[str, str], *, use_cache: bool = False, progress: bool = True,
                 what: str = "file", against: str = "its recorded sha256"):
        self.folder = Path(folder)
        self.files: dict[str, VerifiedFile] = {}
        self._mirror: Scratch | None = None
        self._closed = False
        root = self.folder.resolve()
        try:
            for name, digest in digests.items():
                confined(self.folder, name, digests)  # a plain relative name inside the folder (and the mirror)
                self.files[name] = VerifiedFile(self.folder / name, digest, within=root, use_cache=use_cache,
                                                progress=progress, what=what, against=against)
        except BaseException:
            self.close()
            raise

    def path(self, name: str) -> Path:
        """A path inside the private mirror that opens the verified file `name` (the mirror is made at first use)."""
        if self._closed:
            raise SvdExportError(f"the files of {self.folder} were closed (the engine was closed); load it again")
        if name not in self.files:
            raise SvdExportError(f"{self.folder}/{name} was not verified")
        if not _PROC_FD.is_dir():  # not Linux: the file by its name, checked (check_unchanged) but not pinned
            return self.files[name].path
        if self._mirror is None:
            mirror = Scratch("verified")
            for n, f in self.files.items():
                link = mirror.path / n
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(f.link)
            self._mirror = mirror
        path = VerifiedPath(self._mirror.path / name)
        path.origin = self.files[name].path
        return path

    def check_unchanged(self) -> None:
        for f in self.files.values():
            f.check_unchanged()

    def close(self) -> None:
        self._closed = True
        for f in self.files.values():
            f.close()
        if self._mirror is not None:
            self._mirror.remove()
