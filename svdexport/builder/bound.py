"""A compiled engine's weights, bound at load instead of compiled in (export/bindings.py).

An engine built from a local checkpoint (a diffusers folder or one .safetensors file) references the
checkpoint's bytes: `bindings.json` says, per graph constant, which file and byte range it is, and only what
the checkpoint does not hold (lifted constants, tensors a layout conversion had to concatenate) goes into the
engine's own `constants.safetensors`. A bundled model, or `build --embed-weights`, keeps every weight in that
file instead: a self-contained engine, to ship to another machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from svdexport import tensorfile
from svdexport.export import GraphExport
from svdexport.export.bindings import bind, graph_constants
from svdexport.runtime import manifest as mf

if TYPE_CHECKING:  # builder imports this module
    from svdexport.builder.build import Prepared

BINDINGS_FILE = "bindings.json"
CONSTANTS_FILE = "constants.safetensors"


def references(p: "Prepared", embed: bool) -> bool:
    """Whether the engine references the checkpoint: a local one, not asked to embed."""
    return not embed and bool(p.loaded.files) and not p.info.source.startswith("bundled:")


def write_bound(p: "Prepared", graphs: dict[str, GraphExport], engine_dir: Path, embed: bool) -> mf.BoundWeights:
    """Writes bindings.json and constants.safetensors into `engine_dir`; returns the manifest's record."""
    referenced = references(p, embed)
    constants = {name: graph_constants(g.program) for name, g in graphs.items()}
    names = {id(t): k for k, t in p.model.state_dict(keep_vars=True).items()}
    bindings, own = bind(constants, names, p.loaded.origins if referenced else {}, embed_all=not referenced)
    (engine_dir / BINDINGS_FILE).write_text(json.dumps(bindings.to_dict(), sort_keys=True) + "\n")
    tensorfile.write(engine_dir / CONSTANTS_FILE, own, {"format": "svdexport.constants"})
    files = [mf.ReferencedFile(str(f.path.resolve()), f.digest(use_cache=True), f.stat.st_size)
             for f in p.loaded.files] if referenced else []  # the build key's hashing filled the cache
    embedded = sum(t.numel() * t.element_size() for t in own.values())
    return mf.BoundWeights(files, BINDINGS_FILE, CONSTANTS_FILE, bindings.referenced_bytes(), embedded)
