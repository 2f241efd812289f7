"""AOTInductor: torch.export programs compiled ahead of time into .pt2 packages (CPU or CUDA)."""

from __future__ import annotations

from pathlib import Path

from svdexport.errors import SvdExportError
from svdexport.export import GRAPHS, Backend, GraphExport, LoadSpec, compiled_pair


class AotiBackend(Backend):
    name = "aoti"
    weight_copies = 3.5  # measured 3.1 (fp32) and 3.3 (bf16) on bundled:flux1-reduced, rounded up

    def build(self, graphs: dict[str, GraphExport], engine_dir: Path, graphs_dir: Path) -> dict:
        from torch._inductor import aoti_compile_and_package

        for name in GRAPHS:
            try:
                aoti_compile_and_package(graphs[name].program, package_path=str(engine_dir / f"{name}.aoti.pt2"))
            except Exception as e:
                raise SvdExportError(f"AOTInductor failed on the {name} graph: {str(e).splitlines()[0]}") from e
        return {"packages": {n: f"{n}.aoti.pt2" for n in GRAPHS}}

    def load(self, engine_dir: Path, spec: LoadSpec):
        from torch._inductor import aoti_load_package

        return compiled_pair(spec, lambda n: aoti_load_package(str(engine_dir / f"{n}.aoti.pt2")))


BACKEND = AotiBackend()
