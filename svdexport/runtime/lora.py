"""LoRAs in a built engine: the fused weights, named as the compiled graphs name them, and the base values
they replace (pushed back on unload, so the base engine returns bit for bit).

The names come from the family's own graphs built around the fused transformer: a graph's state dict names
each parameter as torch.export (and from it AOTInductor's constants and the ONNX initializers) names it, so
no name is mapped by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from svdexport.export import GRAPHS
from svdexport.models.family import Family
from svdexport.models.lora import Fused

Weights = dict[str, dict[str, torch.Tensor]]  # graph name -> parameter FQN in that graph -> value


@dataclass
class WeightSwap:
    """New values of the graphs' weights that LoRAs change, and the base values they replace."""

    new: Weights = field(default_factory=dict)
    base: Weights = field(default_factory=dict)

    def count(self) -> int:
        return len({fqn for g in self.new.values() for fqn in g})

    def cast(self, dtype: torch.dtype) -> "WeightSwap":
        """In the engine's precision (a pipeline's transformer may be in another)."""
        def to(w: Weights) -> Weights:
            return {g: {k: v.to(dtype) if v.is_floating_point() else v for k, v in d.items()} for g, d in w.items()}
        return WeightSwap(to(self.new), to(self.base))


def graph_weights(fam: Family, model: nn.Module, granularity: str, fused: Fused) -> WeightSwap:
    """The changed parameters of `model` (fused in place) under their FQNs in each of the family's graphs."""
    name_of = {id(p): n for n, p in fused.params.items()}
    swap = WeightSwap()
    for graph_name, graph in zip(GRAPHS, fam.graphs(model, granularity)):
        for fqn, tensor in graph.state_dict(keep_vars=True).items():
            name = name_of.get(id(tensor))
            if name is not None:
                swap.new.setdefault(graph_name, {})[fqn] = tensor.detach()
                swap.base.setdefault(graph_name, {})[fqn] = fused.base[name]
    return swap


def to_push(current: WeightSwap, wanted: WeightSwap) -> tuple[Weights, WeightSwap]:
    """What to push to go from the loaded LoRAs' weights (`current`) to `wanted`'s: its new values, and the
    base values of whatever `current` changed and `wanted` does not; and the swap now loaded."""
    push: Weights = {}
    merged = WeightSwap({}, {g: dict(v) for g, v in current.base.items()})
    for g, values in current.new.items():
        for fqn in values:
            push.setdefault(g, {})[fqn] = current.base[g][fqn]
    for g, values in wanted.new.items():
        push.setdefault(g, {}).update(values)
        merged.new[g] = dict(values)
        for fqn, base in wanted.base[g].items():
            merged.base.setdefault(g, {}).setdefault(fqn, base)
    return push, merged
