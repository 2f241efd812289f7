"""Eager PyTorch: the reference backend. Writes no engine file; the graphs are rebuilt from the weights."""

from __future__ import annotations

from pathlib import Path

from svdexport.export import Backend, GraphExport, LoadSpec


class EagerBackend(Backend):
    name = "eager"
    needs_export = False
    weight_copies = 1.3  # the weights once, and the calibration activations

    def build(self, graphs: dict[str, GraphExport], engine_dir: Path, graphs_dir: Path) -> dict:
        return {}

    def load(self, engine_dir: Path, spec: LoadSpec):
        return spec.eager_graphs()


BACKEND = EagerBackend()
