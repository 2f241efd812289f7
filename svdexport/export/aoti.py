"""AOTInductor: torch.export programs compiled ahead of time into .pt2 packages (CPU or CUDA).

Loading a package extracts its shared library (and, on CUDA, its kernels) into a temporary folder. torch
picks the system temporary folder and leaves it there, so each load is pointed at a `files.Scratch`
folder of its own, removed when the engine is closed, garbage-collected or the process exits (and, for a
killed process, by the next load).
"""

from __future__ import annotations

from pathlib import Path

import torch

from svdexport.errors import SvdExportError
from svdexport.export import GRAPHS, Backend, GraphExport, LoadSpec, compiled_pair, missing_weights, open_engine_file
from svdexport.files import Scratch
from svdexport.quiet import quiet


class AotiBackend(Backend):
    name = "aoti"
    weight_copies = 3.5  # measured 3.1 (fp32) and 3.3 (bf16) on bundled:flux1-reduced, rounded up

    def build(self, graphs: dict[str, GraphExport], engine_dir: Path, graphs_dir: Path) -> dict:
        from torch._inductor import aoti_compile_and_package

        for name in GRAPHS:
            try:
                with quiet():  # the C++ compiler's and Inductor's warnings; --verbose shows them
                    aoti_compile_and_package(graphs[name].program, package_path=str(engine_dir / f"{name}.aoti.pt2"))
            except Exception as e:
                raise SvdExportError(f"AOTInductor failed on the {name} graph: {str(e).splitlines()[0]}") from e
        return {"packages": {n: f"{n}.aoti.pt2" for n in GRAPHS}}

    def load(self, engine_dir: Path, spec: LoadSpec):
        from torch._inductor import aoti_load_package

        scratch = Scratch("aoti")

        def one(name: str):
            path = spec.file("packages", name, engine_dir)
            with scratch.as_tmpdir():
                return open_engine_file(path, "an AOTInductor package", lambda: aoti_load_package(str(path)))

        pair = compiled_pair(spec, one)
        for graph in pair:
            graph.scratch = scratch  # lives as long as either graph; Engine.close removes it at once
        return pair

    fixed_weights = None

    def update_weights(self, graphs: tuple, weights: dict[str, dict[str, torch.Tensor]], spec: LoadSpec) -> None:
        """AOTInductor's constant-buffer update: the package's constants are the parameters by FQN (no
        compile-time folding of weights), copied into the loaded model's buffers."""
        for name, graph in zip(GRAPHS, graphs):  # both checked before either changes
            missing_weights(name, weights.get(name) or {}, graph.fn.get_constant_fqns())
        for name, graph in zip(GRAPHS, graphs):
            given = weights.get(name) or {}
            if given:
                graph.fn.load_constants({k: v.detach().to(spec.device).contiguous() for k, v in given.items()},
                                        check_full_update=False)


BACKEND = AotiBackend()
