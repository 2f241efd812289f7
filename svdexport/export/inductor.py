"""torch.compile (Inductor): the engine is the torch.export programs, compiled when the engine loads.

Compiled graphs go to Inductor's on-disk FX graph cache (TORCHINDUCTOR_CACHE_DIR, by default
/tmp/torchinductor_$USER), so a later load of the same engine reuses them (measured on the bundled
model: 31 s cold, 8 s warm). Point TORCHINDUCTOR_CACHE_DIR at a persistent folder to keep it across reboots.
"""

from __future__ import annotations

from pathlib import Path

import torch

from svdexport.export import GRAPHS, Backend, GraphExport, LoadSpec, compiled_pair, link_or_copy, open_engine_file
from svdexport.export.eager import copy_into_modules


class InductorBackend(Backend):
    name = "inductor"
    weight_copies = 2.5  # export and save: estimated from the steps, not measured

    def build(self, graphs: dict[str, GraphExport], engine_dir: Path, graphs_dir: Path) -> dict:
        for name in GRAPHS:
            link_or_copy(graphs[name].program_path, engine_dir / f"{name}.pt2")
        return {"programs": {n: f"{n}.pt2" for n in GRAPHS}, "compiled": "at load"}

    def load(self, engine_dir: Path, spec: LoadSpec):
        def compile_one(name: str):
            path = spec.file("programs", name, engine_dir)
            program = open_engine_file(path, "a torch.export program", lambda: torch.export.load(str(path)))
            # A ranged engine's program has dynamic dimensions: compile for all of them (dynamic=False would
            # specialise and recompile per shape). Dynamo still specialises size 1, so a batch-1 request
            # compiles once more (cached on disk like the rest).
            compiled = torch.compile(program.module(), dynamic=spec.ranged, fullgraph=True)
            # Compile now, at load, so that the first generation is not charged with it.
            g = spec.graphs[name]
            with torch.no_grad():
                compiled(*(torch.zeros(s, dtype=getattr(torch, d), device=spec.device)
                           for s, d in zip(g.input_shapes, g.input_dtypes)))
            return compiled

        return compiled_pair(spec, compile_one)

    fixed_weights = None

    def update_weights(self, graphs: tuple, weights: dict[str, dict[str, torch.Tensor]], spec: LoadSpec) -> None:
        # torch.compile reads the program module's parameters as graph inputs (inlined nn modules, no
        # freezing): new values copied into them take effect without recompiling.
        copy_into_modules({n: g.fn._orig_mod for n, g in zip(GRAPHS, graphs)}, weights)


BACKEND = InductorBackend()
