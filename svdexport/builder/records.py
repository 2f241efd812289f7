"""What a build records of itself: the engine it may reuse, its peak memory and its graphs' signatures."""

from __future__ import annotations

from pathlib import Path

import torch

from svdexport.errors import SvdExportError
from svdexport.export import GraphExport, GraphSpec
from svdexport.runtime import manifest as mf


def existing(out: Path, key: str) -> mf.Manifest | None:
    """The manifest of a valid engine at `out` built with the same key, else None."""
    if not (out / mf.MANIFEST).exists():
        return None
    try:
        manifest = mf.read(out)
    except SvdExportError:
        return None  # damaged or outdated: rebuild it
    return manifest if manifest.build_key == key else None


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def parameter_count(module: torch.nn.Module) -> int:
    """Distinct parameters a graph holds (shared submodules counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def describe(graphs: dict[str, GraphExport]) -> dict[str, GraphSpec]:
    """Each graph's inputs, outputs, parameter count, example shapes and dtypes (the manifest's `graphs`)."""
    return {name: GraphSpec(g.input_names, g.output_names, parameter_count(g.module),
                            [list(a.shape) for a in g.args], [str(a.dtype).removeprefix("torch.") for a in g.args])
            for name, g in graphs.items()}
