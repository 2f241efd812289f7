"""`build --attention sparse[:tile=AxB[xC],window=N|AxB[xC]]` (issue 27 item 4; docs/sparse.md).

The option is checked before the work (`normalized`, from BuildOptions.validate): its text, the family, the backend
and a static engine, each refused in one line. The layout is made for the build shapes before the weights load
(`layout`: a tile larger than the token grid, or a window that skips nothing, is refused there) and installed on the
transformer before its graphs are made (`install`), so calibration, the step plans and the full-compute graph all
run the sparse attention (the cached-step graph runs none). The manifest records it (`record`); a load rebuilds the
same layout for the eager graphs (runtime/base.py), while a compiled engine binds its tables like any constant.

Backends: torch 2.13 cannot `torch.export.save` a FlexAttention program, so export_programs leaves a note in the
graphs folder instead of full.pt2, and: aoti compiles the full graph from the in-memory program; inductor rebuilds
it at load from the model's config, binds the engine's constants to it and compiles it (export/inductor.py); eager
is the reference (the same mask, dense, through SDPA). onnx and tensorrt are refused (sparse_processor.REFUSALS).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from svdexport.errors import SvdExportError
from svdexport.models.family import Shapes
from svdexport.models.sparse_attention import AttentionRecord, SparseLayout, parse_attention
from svdexport.models.sparse_processor import AXES, install, layout_for, refusal

if TYPE_CHECKING:  # builder.build imports this module
    from svdexport.builder.build import BuildOptions


def normalized(opts: "BuildOptions") -> str:
    """`opts.attention` as the build key and the manifest record it ("dense", or the sparse option in full, the
    family's defaults filled in); refuses, in one line, what no build could make."""
    if opts.attention in (None, "dense"):
        return "dense"
    if opts.model not in AXES:
        raise SvdExportError(f"--attention sparse is not available for {opts.model} models (flux and hunyuanvideo)")
    spec = parse_attention(opts.attention, AXES[opts.model])
    ranged = any(v is not None for v in (*opts.min_shapes.values(), *opts.max_shapes.values()))
    why = refusal(opts.backend, ranged)
    if why is not None:
        raise SvdExportError(why)
    return spec.text()


def layout(opts: "BuildOptions", shapes: Shapes) -> SparseLayout | None:
    """The layout of the build shapes (None: dense), made before the weights load."""
    if opts.attention == "dense":
        return None
    return layout_for(opts.model, shapes, parse_attention(opts.attention, AXES[opts.model]))


def installed(model: nn.Module, lay: SparseLayout | None) -> nn.Module:
    """The transformer with the layout on its block attentions (before its graphs are made); dense: as it is."""
    if lay is not None:
        install(model, lay)
    return model


def key_parts(opts: "BuildOptions") -> dict:
    """The build key's entry: none for dense (a dense engine keeps the key it had before the option)."""
    return {} if opts.attention == "dense" else {"attention": opts.attention}


def record(model: nn.Module) -> AttentionRecord | None:
    """The manifest's record of the transformer's installed layout; None for dense attention."""
    lay = getattr(model, "sparse_layout", None)
    return None if lay is None else AttentionRecord.of(lay)
