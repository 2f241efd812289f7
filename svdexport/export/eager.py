"""Eager PyTorch: the reference backend. Writes no engine file; loads the diffusers transformer."""

from __future__ import annotations

from pathlib import Path

import torch

from svdexport.export import Backend, GraphExport
from svdexport.models import family


class EagerBackend(Backend):
    name = "eager"
    needs_export = False

    def build(self, graphs: dict[str, GraphExport], engine_dir: Path, graphs_dir: Path) -> dict:
        return {}

    def load(self, engine_dir: Path, manifest: dict):
        fam = family(manifest["model"]["family"])
        weights = manifest["model"]["weights"]
        model, info = fam.load(weights["source"], getattr(torch, manifest["dtype"]))
        info.verify(weights)
        return fam.graphs(model.to(manifest.get("device", "cpu")), manifest["cache"]["granularity"])


BACKEND = EagerBackend()
