"""DiT families behind one declared contract (`models.family.Family`), registered by name.

Adding a family is adding its file and one entry in `FAMILIES`; nothing above `models/` changes.
"""

from __future__ import annotations

from svdexport.errors import SvdExportError
from svdexport.models.family import Family
from svdexport.models.flux import FLUX
from svdexport.models.hunyuanvideo import HUNYUANVIDEO
from svdexport.models.sd3 import SD3

FAMILIES: dict[str, Family] = {f.name: f for f in (FLUX, HUNYUANVIDEO, SD3)}


def family(name: str) -> Family:
    """The registered family `name`; an unknown name is the user's one-line error."""
    if name not in FAMILIES:
        raise SvdExportError(f"unknown model {name!r} (choose from {', '.join(FAMILIES)})")
    return FAMILIES[name]
