"""AOTInductor: torch.export programs compiled ahead of time into .pt2 packages (CPU or CUDA)."""

from __future__ import annotations

from pathlib import Path

from svdexport.errors import SvdExportError
from svdexport.export import GRAPHS, Backend, GraphExport, compiled_pair


class AotiBackend(Backend):
    name = "aoti"

    def build(self, graphs: dict[str, GraphExport], engine_dir: Path, graphs_dir: Path) -> dict:
        from torch._inductor import aoti_compile_and_package

        for name in GRAPHS:
            try:
                aoti_compile_and_package(graphs[name].program, package_path=str(engine_dir / f"{name}.aoti.pt2"))
            except Exception as e:
                raise SvdExportError(f"AOTInductor failed on the {name} graph: {str(e).splitlines()[0]}") from e
        return {"packages": {n: f"{n}.aoti.pt2" for n in GRAPHS}}

    def load(self, engine_dir: Path, manifest: dict):
        from torch._inductor import aoti_load_package

        return compiled_pair(manifest, lambda n: aoti_load_package(str(engine_dir / f"{n}.aoti.pt2")))


BACKEND = AotiBackend()
