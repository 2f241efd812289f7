"""Eager PyTorch: the reference backend. Writes no engine file; loads the diffusers transformer."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from svdexport.export import Backend
from svdexport.models import family


class EagerBackend(Backend):
    name = "eager"

    def build(self, full: nn.Module, cached: nn.Module, example: dict, engine_dir: Path) -> dict:
        return {}

    def load(self, engine_dir: Path, manifest: dict, progress: bool = False):
        fam = family(manifest["model"]["family"])
        weights = manifest["model"]["weights"]
        source = None if weights["source"] == "bundled" else weights["source"]
        model, info = fam.load(source, getattr(torch, manifest["dtype"]))
        info.verify(weights)
        return fam.graphs(model, manifest["cache"]["granularity"])


BACKEND = EagerBackend()
