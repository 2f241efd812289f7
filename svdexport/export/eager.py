"""Eager PyTorch: the reference backend. Writes no engine file; the graphs are rebuilt from the weights."""

from __future__ import annotations

from pathlib import Path

import torch

from svdexport.export import GRAPHS, Backend, GraphExport, LoadSpec, missing_weights
from svdexport.export.boundary import Boundary, guard_module


class EagerBackend(Backend):
    name = "eager"
    needs_export = False
    weight_copies = 1.1  # the weights once (mapped from the checkpoint), and the calibration activations

    def build(self, graphs: dict[str, GraphExport], engine_dir: Path, graphs_dir: Path) -> dict:
        return {}

    def load(self, engine_dir: Path, spec: LoadSpec):
        """The eager modules, each behind the input boundary of its graph spec (as every backend's graphs)."""
        graphs = spec.eager_graphs()
        for name, module in zip(GRAPHS, graphs):
            guard_module(module, Boundary(spec.graphs[name].input_dtypes, spec.device))
        return graphs

    fixed_weights = None

    def update_weights(self, graphs: tuple, weights: dict[str, dict[str, torch.Tensor]], spec: LoadSpec) -> None:
        copy_into_modules(dict(zip(GRAPHS, graphs)), weights)


def copy_into_modules(modules: dict[str, torch.nn.Module], weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """New values copied into the modules' own parameters (same storage: whatever runs them sees them)."""
    for name, module in modules.items():
        given = weights.get(name) or {}
        own = module.state_dict(keep_vars=True)
        missing_weights(name, given, own)
        with torch.no_grad():
            for fqn, value in given.items():
                own[fqn].copy_(value)


BACKEND = EagerBackend()
