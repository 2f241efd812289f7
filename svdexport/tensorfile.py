"""safetensors files read by mapping them (no copy of a tensor's bytes) and written one tensor at a time.

A multi-GB checkpoint is never held twice: `MappedFile` maps the file once (private, copy-on-write: reads
share the page cache, a write into a tensor copies only that page) and hands out tensors that view the
mapping, so a model built from them takes no memory of its own until a page is touched, and the kernel may
drop untouched or clean pages under pressure. `location` tells, for any tensor, the byte range of the file it
views, which is how an engine names a weight in the user's checkpoint instead of copying it.
`write` streams tensors to disk (each tensor's bytes once, never the whole file in memory), with the header
keys and metadata in sorted order, so the same tensors give the same bytes.

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N, N bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the data; offsets are
relative to the data's start.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from svdexport.errors import SvdExportError
from svdexport.files import atomic_file

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20  # safetensors' own limit on the header's size


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: where its bytes are (absolute offsets in the file), its dtype and shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(f, name: str) -> tuple[dict[str, Entry], dict[str, str]]:
    """The tensors (by key) and metadata of an open safetensors file; a malformed header is one line."""
    size = os.fstat(f.fileno()).st_size
    try:
        f.seek(0)
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(MAX_HEADER, size - 8):
            raise ValueError(f"header length {n} exceeds the file")
        header = json.loads(f.read(n))
        metadata = header.pop("__metadata__", None) or {}
        entries = {}
        for key, v in header.items():
            begin, end = (8 + n + int(o) for o in v["data_offsets"])
            shape = tuple(int(s) for s in v["shape"])
            dtype = DTYPES[v["dtype"]]
            numel = 1
            for s in shape:
                numel *= s
            if not 8 + n <= begin <= end <= size or end - begin != numel * dtype.itemsize:
                raise ValueError(f"tensor {key[:80]!r} has a bad byte range")
            entries[key] = Entry(dtype, shape, begin, end)
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise SvdExportError(f"{name} is not a readable safetensors file: {str(e)[:200]}") from None
    return entries, metadata


class MappedFile:
    """A safetensors file mapped into memory (copy-on-write), its tensors viewing the mapping.

    Opened from a path or from an already open descriptor (the one its bytes were hashed through, so that the
    mapped bytes are the checked ones). The mapping lives as long as any tensor made from it."""

    def __init__(self, path: str | Path, fd: int | None = None):
        self.path = Path(path)
        with open(fd if fd is not None else path, "rb", closefd=fd is None) as f:
            self.entries, self.metadata = read_header(f, str(path))
            self.stat = os.fstat(f.fileno())  # of the very file mapped (what `digest` vouches for)
            size = self.stat.st_size
            self._map = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size else None
        self._base = torch.frombuffer(self._map, dtype=torch.uint8) if self._map is not None else None

    def digest(self, use_cache: bool = False) -> str:
        """sha256 of the mapped bytes themselves (what the model reads), or, with `use_cache`, this user's
        cached digest of the same file unchanged (device, inode, size, mtime, ctime: verified.HashCache)."""
        from svdexport.verified import HashCache, hash_bytes

        cache = HashCache() if use_cache else None
        if cache is not None and (known := cache.get(self.stat)) is not None:
            return known
        digest = hash_bytes(memoryview(self._map) if self._map is not None else b"", self.path.name)
        if cache is not None:
            cache.put(self.stat, digest)
        return digest

    def keys(self) -> list[str]:
        return list(self.entries)

    def tensor(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        return self.view(e.begin, e.dtype, e.shape)

    def view(self, begin: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor of `dtype` and `shape` whose bytes start at file offset `begin` (no copy)."""
        numel = 1
        for s in shape:
            numel *= s
        end = begin + numel * dtype.itemsize
        if self._base is None or not 0 <= begin <= end <= self._base.numel():
            raise SvdExportError(f"{self.path} has no bytes {begin}..{end}: the file is not the one referenced")
        raw = self._base[begin:end]
        if numel == 0 or begin % dtype.itemsize:  # empty, or unaligned (not as safetensors writes): a copy
            return raw.clone().view(dtype).view(shape) if numel else torch.empty(shape, dtype=dtype)
        return raw.view(dtype).view(shape)

    def drop(self, begin: int, end: int) -> None:
        """Gives the pages of bytes begin..end back to the kernel (read again from the file if touched): after a
        tensor was cast to another dtype, its file bytes need not stay resident beside the copy."""
        page = mmap.PAGESIZE
        start, stop = -(-begin // page) * page, end // page * page  # whole pages only: neighbours stay
        if self._map is not None and stop > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: self.tensor(k) for k in self.entries}

    def location(self, t: torch.Tensor) -> int | None:
        """The file offset of `t`'s bytes when `t` is a contiguous view of this mapping, else None."""
        if self._base is None or not t.is_contiguous() or t.device.type != "cpu":
            return None
        begin = t.data_ptr() - self._base.data_ptr()
        if 0 <= begin and begin + t.numel() * t.element_size() <= self._base.numel():
            return begin
        return None


@dataclass
class Located:
    """Where a tensor's bytes are in one of several files (a checkpoint's shards)."""

    file: int  # index into the manifest's referenced weight files
    offset: int  # byte offset of the tensor's first element in that file
    dtype: str  # the file's dtype (safetensors name: "BF16", "F32", ...)
    shape: list[int]


def origins_of(tensors: dict[str, torch.Tensor], files: list[MappedFile]) -> dict[str, Located]:
    """For named tensors (a checkpoint's state dict as loaded, before any cast), where each one's bytes are in
    the mapped `files`; tensors that view none of them (converted, concatenated) are left out."""
    out = {}
    for name, t in tensors.items():
        for i, f in enumerate(files):
            offset = f.location(t)
            if offset is not None and t.dtype in NAMES:
                out[name] = Located(i, offset, NAMES[t.dtype], list(t.shape))
                break
    return out


def write(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Writes a safetensors file atomically, one tensor's bytes at a time (sorted keys and metadata: the same
    tensors give the same bytes); tensors that view a mapped file are read from it as they are written."""
    write_lazy(path, {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}, tensors.__getitem__, metadata)


def write_lazy(path: str | Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
               make: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """`write` of tensors made one at a time by `make(name)` (dtype and shape given up front, in `specs`), each
    dropped once written: the file never has to fit in memory."""
    # Widest dtypes first, as safetensors orders them: every tensor starts aligned to its element size.
    names = sorted(specs, key=lambda k: (-specs[k][0].itemsize, k))
    header, offset = {}, 0
    for key in names:
        dtype, shape = specs[key]
        if dtype not in NAMES:
            raise SvdExportError(f"cannot write a {dtype} tensor ({key}) to safetensors")
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors itself pads
    with atomic_file(Path(path)) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key in names:
            t = make(key).detach().to("cpu", specs[key][0]).contiguous()
            if tuple(t.shape) != tuple(specs[key][1]):
                raise SvdExportError(f"tensor {key} has shape {tuple(t.shape)}, not {specs[key][1]}")
            if t.numel():
                f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
        f.flush()
        os.fsync(f.fileno())
