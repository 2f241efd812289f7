"""Output files that say they are svdexport's: latents (.safetensors), images (.png), videos (.gif, .mp4),
JSON and markdown. Every writer leaves a marker inside the file, and `written_by_svdexport` reads it back,
so a later command may replace its own outputs but never a user's file of the same name.

Writers are byte-reproducible: the same tensors or pixels give the same bytes (sorted metadata, no time
stamps), so two runs with the same engine, seed and settings write identical files.
"""

from __future__ import annotations

import json
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from svdexport.errors import SvdExportError
from svdexport.files import atomic_file

if TYPE_CHECKING:  # torch is imported where tensors are written: outputs (keygen, sign) import this module
    import torch

MARK = "svdexport"  # PNG "Software" text, GIF comment, MP4 "comment" tag, JSON "written_by", markdown comment
LATENTS_FORMAT = "svdexport.latents/1"
_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}  # torch.X -> safetensors


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors format written here with sorted keys: the library keeps metadata in a hash map whose
    order changes from process to process, which made equal latents byte-different files."""
    import torch

    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[str(t.dtype).removeprefix("torch.")], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


@contextmanager
def writing(path: Path) -> Iterator[Path]:
    """atomic_file(path), with an I/O fault while writing (disk full, EIO) refused in one line naming the file;
    the file that was there stays as it was (the write went to a temporary file beside it, now removed)."""
    try:
        with atomic_file(path) as tmp:
            yield tmp
    except OSError as e:
        raise SvdExportError(f"cannot write {path}: {e.strerror or e}") from None


def write_latents(latents: torch.Tensor, path: Path, metadata: dict[str, str]) -> None:
    data = safetensors_bytes({"latents": latents}, {**metadata, "format": LATENTS_FORMAT})
    with writing(path) as tmp:
        tmp.write_bytes(data)


def png_info():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", MARK)
    return info


def write_png(image, path: Path) -> None:
    with writing(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_info())


def write_gif(frames: list, path: Path, duration_ms: int = 150) -> None:
    with writing(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=duration_ms, loop=0,
                       comment=MARK.encode())


def write_mp4(frames: list, path: Path, fps: int = 8) -> None:
    """H.264 through PyAV (its wheels ship FFmpeg with libx264); frames padded to even sizes as yuv420p needs."""
    try:
        import av
    except ImportError:
        raise SvdExportError("MP4 output needs PyAV: pip install av (or write a .gif)") from None
    import numpy as np

    w, h = frames[0].size
    w2, h2 = w + w % 2, h + h % 2
    with writing(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as box:
            box.metadata["comment"] = MARK
            stream = box.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = w2, h2, "yuv420p"
            # Bit-exact output: one thread, no time-dependent settings.
            stream.codec_context.options = {"crf": "18", "threads": "1"}
            stream.codec_context.thread_count = 1
            for frame in frames:
                rgb = np.zeros((h2, w2, 3), dtype=np.uint8)
                rgb[:h, :w] = np.asarray(frame.convert("RGB"))
                for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                    box.mux(packet)
            for packet in stream.encode():
                box.mux(packet)


def write_text(text: str, path: Path) -> None:
    with writing(path) as tmp:
        tmp.write_text(text)


def json_text(data: dict) -> str:
    return json.dumps({"written_by": MARK, **data}, indent=2) + "\n"


def markdown_text(text: str) -> str:
    return text if text.startswith(f"<!-- generated by: {MARK}") else f"<!-- generated by: {MARK} -->\n{text}"


def written_by_svdexport(path: Path) -> bool:
    """Whether an existing file carries the marker of an svdexport writer (by its suffix)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            with open(path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                meta = json.loads(f.read(min(n, 1 << 26))).get("__metadata__") or {}
            return str(meta.get("format", "")).startswith("svdexport.")
        if suffix in (".png", ".gif"):
            from PIL import Image

            with Image.open(path) as im:
                text = im.info.get("Software") if suffix == ".png" else im.info.get("comment", b"")
            return (text.decode(errors="replace") if isinstance(text, bytes) else str(text or "")) == MARK
        if suffix == ".mp4":
            import av

            with av.open(str(path)) as box:
                return box.metadata.get("comment") == MARK
        if suffix == ".json":
            data = json.loads(path.read_text())
            return isinstance(data, dict) and data.get("written_by") == MARK
        if suffix == ".md":
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.readline().startswith(f"<!-- generated by: {MARK}")
    except Exception:  # unreadable, damaged or of another format: not ours
        return False
    return False
