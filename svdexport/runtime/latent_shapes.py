"""Which request shapes final latents are of, so that `Engine.preview` shows any shape the engine serves.

An engine remembers the shapes of the latents its requests made, by tensor identity and without keeping them
alive (`MadeLatents`). Other latents' shapes are inferred from the engine's range: the one shape in it whose
latents have theirs (a ranged FLUX engine's 96x160 and 160x96 have as many tokens: those need `shapes=`).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Callable

import torch

from svdexport.errors import SvdExportError
from svdexport.models.family import Shapes
from svdexport.models.ranges import ShapeRange

LatentsShape = Callable[[Shapes], list[int]]  # the latents' (hidden_states') shape at request shapes


class MadeLatents:
    """The request shapes of latents an engine produced, by identity; holds no tensor alive."""

    def __init__(self):
        self._by_id: dict[int, tuple[weakref.ref, Shapes]] = {}

    def remember(self, latents: torch.Tensor, shapes: Shapes) -> None:
        key, by_id = id(latents), self._by_id
        # The entry goes when the tensor does (before its id can be reused); the callback holds no engine.
        by_id[key] = (weakref.ref(latents, lambda _ref: by_id.pop(key, None)), shapes)

    def shapes_of(self, latents: torch.Tensor) -> Shapes | None:
        entry = self._by_id.get(id(latents))
        return entry[1] if entry is not None and entry[0]() is latents else None


def shapes_for_preview(latents: torch.Tensor, shapes: Shapes | None, made: MadeLatents, served: ShapeRange,
                       latents_shape: LatentsShape) -> Shapes:
    """`shapes` (checked against the latents), else the shapes of the request that made them, else the only
    shapes of the range that give latents of their shape; else one line asking for shapes=."""
    got = list(latents.shape)
    if shapes is not None:
        if latents_shape(shapes) != got:
            raise SvdExportError(f"latents of shape {tuple(got)} are not of shapes {shapes.to_dict()} (those "
                                 f"give {tuple(latents_shape(shapes))})")
        return shapes
    remembered = made.shapes_of(latents)
    if remembered is not None:
        return remembered
    fits = [s for s in _candidates(served, got, latents_shape) if latents_shape(s) == got]
    if len(fits) == 1:
        return fits[0]
    sizes = ", ".join(f"{s.height}x{s.width}" for s in fits[:4])
    why = f"several request shapes give them ({sizes})" if fits else "no shape this engine serves gives them"
    raise SvdExportError(f"cannot tell the shapes of latents of shape {tuple(got)}: {why}; pass "
                         "preview(latents, shapes=engine.request_shapes(batch=..., height=..., width=...))")


def _candidates(served: ShapeRange, got: list[int], latents_shape: LatentsShape) -> list[Shapes]:
    """Shapes of the range with the latents' batch whose latents hold as many values per sample (a latent's
    values per sample are proportional to the image tokens for every family); checked exactly by the caller."""
    opt, lo, hi = served.opt, served.min, served.max
    if not got or not lo.batch <= got[0] <= hi.batch:
        return []
    per_token = math.prod(latents_shape(opt)[1:]), opt.img_tokens  # values per sample over tokens, at opt
    values = math.prod(got[1:])
    step = opt.pixels_per_token
    shapes = (dataclasses.replace(opt, batch=got[0], height=h, width=w)
              for h in range(lo.height, hi.height + 1, step) for w in range(lo.width, hi.width + 1, step))
    return [s for s in shapes if s.img_tokens * per_token[0] == values * per_token[1]]
