"""LoRAs in a built engine, in one place: the checks of `--lora` options, and one engine's LoRA state (the files
fused now, the weights they changed and the base values under them) with every operation on it: load, unload,
set, and push a pipeline's adapters (runtime/pipeline_loras.py hands diffusers' LoRA calls to it).

diffusers and PEFT read and fuse the files (models/lora.py) on a hollow transformer, into which only the
adapted modules' base weights are read. The fused weights are named as the compiled graphs name them: a
graph's state dict names each parameter as torch.export (and from it AOTInductor's constants and the ONNX
initializers) names it, so no name is mapped by hand. The changed weights are pushed into the compiled graphs
without recompiling them; unloading pushes the base values back, so the base engine returns bit for bit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from svdexport.errors import SvdExportError
from svdexport.export import GRAPHS, backend
from svdexport.models.family import Family
from svdexport.models.lora import Fused, LoraFile, adapted_parameters, fuse, fuse_active, hollow_of, install
from svdexport.models.lora import tuner_modules
from svdexport.runtime import static
from svdexport.runtime.base import base_weights
from svdexport.runtime.manifest import Manifest

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


def lora_refusal(backend_name: str, options: dict | None, fam: Family) -> str | None:
    """Why an engine cannot take LoRAs (its backend, with the manifest's backend `options`, cannot replace
    weights, or its family has no diffusers LoRA loader); None when it can."""
    be = backend(backend_name)
    if (refusal := be.weights_refusal(options or {})) is not None:
        return f"backend {backend_name!r} cannot load a LoRA into a built engine: {refusal}"
    if fam.lora_loader is None:
        return f"LoRAs are not supported for {fam.name} models (no diffusers LoRA loader)"
    return None


def check_lora_options(specs: list[str], backend_name: str, fam: Family, no_rebuild: bool = False,
                       options: dict | None = None) -> list[LoraFile]:
    """`--lora FILE[:SCALE]` options, checked before any work: each file a readable LoRA, a number for
    SCALE, an engine that can take new weights (its backend, and `options`, its manifest's backend_options)
    and a family with a LoRA loader. `no_rebuild`: bench's --no-rebuild, which needs --lora."""
    if no_rebuild and not specs:
        raise SvdExportError("--no-rebuild is for --lora")
    if not specs:
        return []
    if (why := lora_refusal(backend_name, options, fam)) is not None:
        raise SvdExportError(f"--lora: {why}")
    return [LoraFile.parse(s) for s in specs]


def _inner(graph):
    """The backend's own graph under a CUDA-graph wrapper."""
    return graph.graph if isinstance(graph, static.StaticGraph) else graph


class EngineLoras:
    """The LoRAs of one loaded engine (`engine.lora`): the files fused now, in load order; the weights they
    changed and the base values under them; and who pushed the weights now loaded (`source`: None for files
    and the build, a pipeline's stand-in for its adapters). The engine folder is never touched."""

    def __init__(self, manifest: Manifest, folder: Path, fam: Family, graphs: tuple):
        self.manifest, self.folder, self.family, self.graphs = manifest, folder, fam, graphs
        self.dtype = getattr(torch, manifest.dtype)
        self.files: list[LoraFile] = []
        self.swap = WeightSwap()
        self.source: object = None

    def check_support(self) -> None:
        """Refuses, in one line, an engine that cannot take LoRAs (see `lora_refusal`)."""
        if (why := lora_refusal(self.manifest.backend, self.manifest.backend_options, self.family)) is not None:
            raise SvdExportError(why)

    def count(self) -> int:
        """How many distinct weights the loaded LoRAs replaced."""
        return self.swap.count()

    def load(self, path, scale: float = 1.0) -> None:
        """Fuses one more LoRA file (diffusers, PEFT, Kohya or BFL names); LoRAs stack: each load fuses all
        loaded ones into the base weights again, in order."""
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise SvdExportError(f"LoRA scale must be a number, got {scale!r}") from None
        self.set([*self.files, LoraFile(Path(path), scale).check()])

    def unload(self) -> None:
        """Pushes the base weights back (bit for bit: the values the engine was built with)."""
        self.set([])

    def set(self, loras: list[LoraFile]) -> None:
        """Exactly these LoRAs fused, in order, into the base weights (none: the base engine)."""
        if loras or self.files:
            self.check_support()
        wanted = WeightSwap()
        if loras:  # fused on a hollow transformer, into which only the adapted modules' base weights are read
            model = hollow_of(self.family.transformer_class(), self.manifest.model.config, self.dtype)
            fused = fuse(model, self.family.lora_loader, loras, fill=lambda names: base_weights(self.manifest, names))
            wanted = graph_weights(self.family, model, self.manifest.cache.granularity, fused)
        self.push(wanted)
        self.files = list(loras)

    def push_adapters(self, hollowed: nn.Module, source: object) -> None:
        """The active adapters of a hollow transformer (a pipeline's, loaded by diffusers) fused onto the
        engine's base weights and pushed in place of any LoRA files; no adapter pushes the base weights."""
        wanted = WeightSwap()
        if tuner_modules(hollowed):
            self.check_support()
            model = copy.deepcopy(hollowed).to("cpu")  # placeholders stay one element each
            # Only the adapted modules' base weights are read (the engine's own, checked unchanged).
            install(model, base_weights(self.manifest, list(adapted_parameters(model))))
            wanted = graph_weights(self.family, model, self.manifest.cache.granularity, fuse_active(model))
        self.push(wanted, source)
        self.files = []  # the pipeline's adapters, not files

    def push(self, wanted: WeightSwap, source: object = None) -> None:
        """Makes the graphs' weights the base ones except `wanted.new`; `source` says who asked (a pipeline
        running the engine gives its adapters so, and compares `source` before pushing again)."""
        push, merged = to_push(self.swap, wanted.cast(self.dtype))
        backend(self.manifest.backend).update_weights(tuple(_inner(g) for g in self.graphs), push,
                                                      self.manifest.load_spec(folder=self.folder))
        for graph in self.graphs:
            if isinstance(graph, static.StaticGraph):
                graph.recapture()  # a captured CUDA graph may hold the old weight buffers' addresses
        self.swap = merged if merged.new else WeightSwap()
        self.source = source

    def copy_to(self, other: "EngineLoras") -> None:
        """The same LoRAs fused into another engine of the same weights (the eager twin of `eager_reference`)."""
        if self.swap.new:
            other.push(self.swap, self.source)
            other.files = list(self.files)
