"""DiT families, one module each. A family module provides what models/base.py lists."""

from __future__ import annotations

from types import ModuleType

from svdexport.errors import SvdExportError

FAMILIES = ("flux", "hunyuanvideo")


def family(name: str) -> ModuleType:
    """The adapter module of a DiT family; adding a family is adding its file and its name here."""
    if name not in FAMILIES:
        raise SvdExportError(f"unknown model {name!r} (choose from {', '.join(FAMILIES)})")
    from importlib import import_module

    return import_module(f"svdexport.models.{name}")
