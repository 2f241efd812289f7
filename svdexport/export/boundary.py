"""The compiled-graph boundary: every positional input as the graph was exported to read it.

A compiled graph takes each input's memory as a contiguous tensor of the dtype it was exported with, on its
device: AOTInductor reads the data pointer with the exported strides and dtype, unchecked, so a stride-0
timestep (`t.expand(B)`) gave every row after the first the wrong values and a float64 timestep reads as
garbage (issue 24). `Boundary` makes every input so, contiguous, in its exported dtype and on the engine's
device, in this one place for every backend: `compiled_pair` puts it in front of each compiled graph, the
eager backend hooks it in front of its modules (`guard_module`). An input that is already right is passed
on as it is (no copy, no new tensor), so the normal path costs a few attribute checks per call.
"""

from __future__ import annotations

import dataclasses

import torch


class Boundary:
    """Makes positional inputs contiguous, of the exported dtypes (GraphSpec.input_dtypes; a None entry keeps
    the input's own) and on `device`. Inputs past the recorded ones, and None inputs (an eager graph's absent
    optional input), pass unchanged."""

    def __init__(self, dtypes: list[str | None], device: str | torch.device):
        self.dtypes = tuple(None if d is None else getattr(torch, d) for d in dtypes)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())  # where .to("cuda") puts a tensor
        self.device = device

    def right(self, t: torch.Tensor | None, dtype: torch.dtype | None) -> bool:
        return t is None or ((dtype is None or t.dtype == dtype) and t.device == self.device and t.is_contiguous())

    def __call__(self, inputs: tuple) -> tuple:
        """`inputs` itself when every one is right, else a tuple with the wrong ones converted."""
        if all(self.right(t, d) for t, d in zip(inputs, self.dtypes)):
            return inputs
        fixed = tuple(t if self.right(t, d) else t.to(device=self.device, dtype=d).contiguous()
                      for t, d in zip(inputs, self.dtypes))
        return fixed + tuple(inputs[len(fixed):])


def guard_module(module: torch.nn.Module, boundary: Boundary) -> torch.nn.Module:
    """`module` itself, its positional inputs passed through `boundary` first (a forward pre-hook: the module
    keeps its identity and parameters, so weights copied into it in place still reach it)."""

    def hook(_module, args: tuple):
        fixed = boundary(args)
        return None if fixed is args else fixed

    module.register_forward_pre_hook(hook)
    return module


def retyped(graphs: dict, old: str, new: str) -> dict:
    """Graph specs (GraphSpec by name) for an eager twin in precision `new` of an engine in `old`, as a build in
    `new` records them where the record tells: below float32, the inputs recorded in `old` are the ones that
    follow the precision (activations, timestep, residuals) and become `new`, the others (float32 bases,
    coefficients, rotary table; int64 masks) keep theirs. A float32 engine records both kinds as float32: those
    inputs get None, the twin's boundary keeps their dtype (its own inputs give it)."""
    def twin(d: str) -> str | None:
        return d if d != old else (None if old == "float32" else new)

    return {name: dataclasses.replace(g, input_dtypes=[twin(d) for d in g.input_dtypes]) for name, g in graphs.items()}
