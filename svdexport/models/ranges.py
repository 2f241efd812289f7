"""Shape ranges: one engine for every shape between a minimum and a maximum (issue 15).

A static engine serves its build shapes only; a ranged engine serves every shape whose ranged axes lie
between `min` and `max` (height and width in multiples of the family's pixels per token), and is optimised
for `opt`, the build shapes. SVD-Cache's bases live in the feature dimension, so one set serves every shape.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from svdexport.errors import SvdExportError
from svdexport.models.family import Shapes

# The axes an engine can range over (video frames stay fixed per engine).
RANGED_AXES = ("batch", "height", "width", "text_len")
OPTION = {"batch": "batch", "height": "height", "width": "width", "text_len": "text-len"}


@dataclass
class ShapeRange:
    """min <= opt <= max on every axis; an axis with min == max is fixed."""

    min: Shapes
    opt: Shapes
    max: Shapes

    @property
    def ranged(self) -> bool:
        return self.min != self.max

    def describe(self, axis: str) -> str:
        lo, hi = getattr(self.min, axis), getattr(self.max, axis)
        step = f" in multiples of {self.opt.pixels_per_token}" if axis in ("height", "width") else ""
        return f"{lo}..{hi}{step}" if lo != hi else f"{lo} only"

    def check(self, shapes: Shapes) -> Shapes:
        """`shapes` when every axis is in range; else one line naming the axis and the range."""
        for axis in self.opt.names():
            v, lo, hi = getattr(shapes, axis), getattr(self.min, axis), getattr(self.max, axis)
            if not lo <= v <= hi:
                fix = f" (rebuild with --max-{OPTION[axis]} to serve a range)" if axis in OPTION and lo == hi else ""
                kind = "ranged" if self.ranged else "static"
                raise SvdExportError(f"{axis} {v} is outside this {kind} engine's range: {axis} {self.describe(axis)}"
                                     f"{fix}")
        return shapes

    def request(self, **values) -> Shapes:
        """The build shapes with the given axes (None: the build's) replaced, validated and in range."""
        given = {k: v for k, v in values.items() if v is not None}
        return self.check(dataclasses.replace(self.opt, **given).validate())

    def to_dicts(self) -> tuple[dict, dict]:
        return self.min.to_dict(), self.max.to_dict()


def static(opt: Shapes) -> ShapeRange:
    return ShapeRange(opt, opt, opt)


def shape_range(family: str, opt: Shapes, lows: dict, highs: dict) -> ShapeRange:
    """The range of a build from its --min-* / --max-* options (None or absent: not given), checked in one
    line before any work. A ranged axis without --min-* starts at batch 1, one token side (16 px) or 1 text
    token; without --max-* it ends at the build shape. No option: the static range of `opt`."""
    lows = {k: v for k, v in lows.items() if v is not None}
    highs = {k: v for k, v in highs.items() if v is not None}
    for axis in (*lows, *highs):
        if axis not in RANGED_AXES:
            raise SvdExportError(f"{family} engines cannot range over {axis} (ranged axes: {', '.join(RANGED_AXES)})")
    smallest = {"batch": 1, "height": opt.pixels_per_token, "width": opt.pixels_per_token, "text_len": 1}
    lo, hi = opt.to_dict(), opt.to_dict()
    for axis in set(lows) | set(highs):
        lo[axis] = lows.get(axis, min(smallest[axis], lo[axis]))
        hi[axis] = highs.get(axis, hi[axis])
    for axis in RANGED_AXES:
        o = getattr(opt, axis)
        if lo[axis] > o:
            raise SvdExportError(f"--min-{OPTION[axis]} {lo[axis]} is above --{OPTION[axis]} {o}")
        if hi[axis] < o:
            raise SvdExportError(f"--max-{OPTION[axis]} {hi[axis]} is below --{OPTION[axis]} {o}")
        for end, values in (("min", lo), ("max", hi)):
            v, unit = values[axis], opt.pixels_per_token
            if axis in ("height", "width") and (v < unit or v % unit):
                raise SvdExportError(f"--{end}-{OPTION[axis]} {v} must be a positive multiple of {unit}")
            if v < 1:
                raise SvdExportError(f"--{end}-{OPTION[axis]} must be >= 1, got {v}")
    return ShapeRange(type(opt)(**lo).validate(), opt, type(opt)(**hi).validate())


def parse_sizes(text: str | None, option: str) -> list[tuple[int, int]]:
    """'96x96,128x160' -> [(96, 96), (128, 160)] as (height, width); anything else is one line naming `option`."""
    if not text:
        return []
    try:
        out = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        out = []
    if not out or any(len(r) != 2 for r in out):
        raise SvdExportError(f"{option} must be a comma list of HEIGHTxWIDTH, e.g. 96x96,160x160, got {text!r}")
    return out
