"""torch.compile (Inductor): the engine is the torch.export programs, compiled when the engine loads.

Compiled kernels go to Inductor's cache (TORCHINDUCTOR_CACHE_DIR, by default ~/.cache/svdexport/inductor),
so a second load of the same engine reuses them instead of compiling again.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from svdexport.export import GRAPHS, Backend, GraphExport, compiled_pair, link_or_copy


class InductorBackend(Backend):
    name = "inductor"

    def build(self, graphs: dict[str, GraphExport], engine_dir: Path, graphs_dir: Path) -> dict:
        for name in GRAPHS:
            link_or_copy(graphs[name].program_path, engine_dir / f"{name}.pt2")
        return {"programs": {n: f"{n}.pt2" for n in GRAPHS}, "compiled": "at load"}

    def load(self, engine_dir: Path, manifest: dict):
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "svdexport" / "inductor"))

        def compile_one(name: str):
            program = torch.export.load(str(engine_dir / f"{name}.pt2"))
            compiled = torch.compile(program.module(), dynamic=False, fullgraph=True)
            # Compile now, at load, so that the first generation is not charged with it.
            g = manifest["graphs"][name]
            device = manifest.get("device", "cpu")
            with torch.no_grad():
                compiled(*(torch.zeros(s, dtype=getattr(torch, d), device=device)
                           for s, d in zip(g["input_shapes"], g["input_dtypes"])))
            return compiled

        return compiled_pair(manifest, compile_one)


BACKEND = InductorBackend()
