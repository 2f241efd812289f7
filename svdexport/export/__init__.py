"""Backends turn the two graphs into engines. One file per backend, all behind `Backend`."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from svdexport.errors import SvdExportError

BACKENDS = ("eager",)


class Backend:
    """Builds engine files from the graphs and loads them back as callables with `input_names`."""

    name = ""

    def build(self, full: nn.Module, cached: nn.Module, example: dict, engine_dir: Path) -> dict:
        """Writes this backend's files into engine_dir; returns what the manifest should record."""
        raise NotImplementedError

    def load(self, engine_dir: Path, manifest: dict, progress: bool = False):
        """(full graph, cached graph) ready to call."""
        raise NotImplementedError


def backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise SvdExportError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    from importlib import import_module

    return import_module(f"svdexport.export.{name}").BACKEND
