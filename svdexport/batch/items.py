"""The items of a batch job and their outputs on disk.

Layout of an output folder:
  job.json             what the folder holds: engine (build key), items file digest, seed, LoRAs (digest and
                       scale); a rerun with another engine, list or LoRAs is refused instead of mixing outputs
  NNNNNN.png           one image (or frame grid) per item, written atomically
  NNNNNN.json          its metadata, written atomically after the image: it marks the item done, when it names
                       the item and the image decodes (a damaged or empty one is made again)
  metadata.jsonl       every finished item's metadata in item order, rewritten at the end of each run
  summary.json         the counts of the last run (done, skipped, retried, failed) and the failures
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from svdexport.errors import SvdExportError
from svdexport.files import read_json, sha256_file
from svdexport.media import writing


@dataclass
class Item:
    index: int  # position in the list; names the output files
    text: str  # the prompt, or the class name for class-conditioned engines
    seed: int  # noise seed: the job's --seed plus the index

    @property
    def stem(self) -> str:
        return f"{self.index:06d}"


def read_items(path: Path, seed: int) -> list[Item]:
    """One item per non-empty line (# comments skipped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SvdExportError(f"cannot read {path}: {e}") from None
    texts = [t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")]
    if not texts:
        raise SvdExportError(f"{path} has no items (one prompt or class per line)")
    return [Item(i, t, seed + i) for i, t in enumerate(texts)]


def open_job(out: Path, engine_key: str, items_path: Path, seed: int, loras: list | None = None) -> None:
    """Creates the output folder or checks that it belongs to this job (same engine, list, seed and LoRAs)."""
    out = Path(out)
    record = {"engine_build_key": engine_key, "items_sha256": hashlib.sha256(Path(items_path).read_bytes()).hexdigest(),
              "seed": seed}
    if loras:  # recorded only when given: job folders written before LoRAs existed stay valid
        record["loras"] = [{"sha256": sha256_file(lora.path), "scale": lora.scale} for lora in loras]
    job = out / "job.json"
    if job.exists():
        try:
            old = read_json(job)
        except SvdExportError as e:  # not UTF-8, malformed, too deep: named in one line
            raise SvdExportError(f"{e}; use another --out") from None
        if not isinstance(old, dict):
            raise SvdExportError(f"{job} is damaged (not a JSON object); use another --out")
        differs = [k for k in {**old, **record} if old.get(k) != record.get(k)]
        if differs:
            raise SvdExportError(f"{out} holds the outputs of another job (different {differs[0].replace('_', ' ')}); "
                                 "use another --out")
        return
    if out.exists() and any(out.iterdir()):
        raise SvdExportError(f"{out} is not empty and holds no svdexport batch job; use another --out")
    with writing(job) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def done(out: Path, item: Item) -> bool:
    """Finished in an earlier run: the metadata names this very item and the image decodes (an empty or cut
    PNG, or damaged metadata, is not done: the item is made again)."""
    meta, image = Path(out) / f"{item.stem}.json", Path(out) / f"{item.stem}.png"
    if not (meta.is_file() and image.is_file()):
        return False
    try:
        m = read_json(meta)
    except SvdExportError:
        return False
    return isinstance(m, dict) and m.get("text") == item.text and m.get("seed") == item.seed and decodes(image)


def decodes(path: Path) -> bool:
    """Whether an image file decodes whole (PIL reads every pixel)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, ... for damaged files
        return False
    return True


def write(out: Path, item: Item, png: bytes, meta: dict) -> None:
    """Image first, metadata last: a crash between the two leaves the item not done, to be redone."""
    with writing(Path(out) / f"{item.stem}.png") as tmp:
        tmp.write_bytes(png)
    with writing(Path(out) / f"{item.stem}.json") as tmp:
        tmp.write_text(json.dumps({**asdict(item), **meta}) + "\n")


def collect(out: Path, items: list[Item]) -> int:
    """metadata.jsonl from the finished items, in item order; returns how many there are."""
    lines = [(Path(out) / f"{i.stem}.json").read_text().strip() for i in items if done(out, i)]
    with writing(Path(out) / "metadata.jsonl") as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))
    return len(lines)
