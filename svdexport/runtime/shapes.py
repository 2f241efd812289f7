"""The shapes a loaded engine serves (its build shapes and its range, models/ranges.py) and the checks of a
request against them: request shapes in range, and graph inputs of those shapes, refused in one line."""

from __future__ import annotations

from typing import Callable

import torch

from svdexport.errors import SvdExportError
from svdexport.models.family import Shapes
from svdexport.models.ranges import ShapeRange

ExampleInputs = Callable[[Shapes], dict[str, torch.Tensor]]  # the family's inputs at some shapes


class ServedShapes:
    """An engine's build shapes (`build`, a ranged engine's optimum), its range, and every graph input's shape
    at any shapes it serves (from the family's own inputs at those shapes, `example`, memoised)."""

    def __init__(self, served: ShapeRange, built_inputs: dict[str, list[int]], example: ExampleInputs):
        self.range, self.build, self.example = served, served.opt, example
        self.built_inputs = built_inputs  # every input's shape at the build shapes, as the manifest records it
        self._inputs: dict[tuple, dict[str, list[int]]] = {}

    def request(self, batch: int | None = None, height: int | None = None, width: int | None = None,
                text_len: int | None = None) -> Shapes:
        """The build shapes with the given axes replaced; refused in one line outside the engine's range."""
        return self.range.request(batch=batch, height=height, width=width, text_len=text_len)

    def inputs_at(self, shapes: Shapes) -> dict[str, list[int]]:
        """Every graph input's shape at `shapes`."""
        key = tuple(shapes.to_dict().items())
        if key not in self._inputs:
            x = self.example(shapes)
            self._inputs[key] = {k: list(v.shape) for k, v in x.items() if k in self.built_inputs}
        return self._inputs[key]

    def check(self, inputs: dict[str, torch.Tensor], shapes: Shapes | None = None) -> None:
        """Refuses, in one line, inputs that are not of `shapes` (default: the build shapes); a ranged engine
        without `shapes` (a pipeline's call) takes inputs whose every dimension lies in its range."""
        span = shapes is None and self.range.ranged
        build = shapes is None or shapes == self.build
        if span:
            lo, hi = self.inputs_at(self.range.min), self.inputs_at(self.range.max)
        wanted = self.built_inputs if build else self.inputs_at(shapes)
        for name, want in wanted.items():
            got = inputs.get(name)
            if got is None:
                raise SvdExportError(f"input {name!r} is missing")
            shape = list(got.shape)
            if span and not _within(shape, lo[name], hi[name]):
                raise SvdExportError(f"input {name!r} has shape {tuple(shape)}; this ranged engine takes "
                                     f"{tuple(lo[name])} to {tuple(hi[name])}")
            if not span and shape != want:
                at = "this engine was built for" if build else f"at {shapes.to_dict()} it must be"
                raise SvdExportError(f"input {name!r} has shape {tuple(shape)}; {at} {tuple(want)}")


def _within(shape: list[int], lo: list[int], hi: list[int]) -> bool:
    return len(shape) == len(lo) and all(a <= g <= b for a, g, b in zip(lo, shape, hi))
