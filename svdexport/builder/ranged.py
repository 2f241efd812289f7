"""What a ranged build (issue 15) adds: the graphs' inputs at the ends of the shape range, and the manifest's
record of the range.

The exporters need, per input, which dimensions vary and between which sizes. Both come from the inputs at
the smallest and the largest shapes of the range; the cached graph's C and R are outputs of the full graph,
so their shapes come from running it under FakeTensorMode (shapes only: no memory, no FLOPs, whatever the
largest shape).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from svdexport.runtime import manifest as mf

State = dict[str, torch.Tensor]


def trace_shapes(r) -> object:
    """The shapes the graphs are exported at: the build shapes, but with batch 2 where the batch ranges over
    1: torch.export specialises a dimension of size 1 (it would not be dynamic)."""
    if r.opt.batch == 1 and r.max.batch > 1:
        return dataclasses.replace(r.opt, batch=2)
    return r.opt


def range_states(p, inputs_at: Callable[[object], State],
                 state_of: Callable[[State], State]) -> tuple[State, tuple[State, State]]:
    """(every graph input at the trace shapes, (the same at the range's min, at its max)); the ends are
    fake tensors: only their shapes are read."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    state = state_of(inputs_at(trace_shapes(p.range)))
    ends = []
    for shapes in (p.range.min, p.range.max):
        example = inputs_at(shapes)  # real, small: noise and conditioning
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            ends.append(state_of({k: mode.from_tensor(v) for k, v in example.items()}))
    return state, (ends[0], ends[1])


def shapes_record(p, example: State) -> mf.ShapesRecord:
    inputs = {k: list(v.shape) for k, v in example.items()}
    if not p.range.ranged:
        return mf.ShapesRecord(build=p.shapes.to_dict(), inputs=inputs)
    lo, hi = p.range.to_dicts()
    return mf.ShapesRecord(build=p.shapes.to_dict(), inputs=inputs, kind=mf.EngineKind.RANGED, min=lo, max=hi)
