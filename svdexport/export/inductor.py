"""torch.compile (Inductor): the engine is the torch.export programs, compiled when the engine loads.

Compiled graphs go to Inductor's on-disk FX graph cache (TORCHINDUCTOR_CACHE_DIR, by default
/tmp/torchinductor_$USER), so a later load of the same engine reuses them (measured on the bundled
model: 31 s cold, 8 s warm). Point TORCHINDUCTOR_CACHE_DIR at a persistent folder to keep it across reboots.
"""

from __future__ import annotations

from pathlib import Path

import torch

from svdexport.errors import SvdExportError
from svdexport.export import GRAPHS, Backend, GraphExport, LoadSpec, check_signature, compiled_pair, link_or_copy
from svdexport.export import open_engine_file, with_constants
from svdexport.export.eager import copy_into_modules
from svdexport.progress import phase


class InductorBackend(Backend):
    name = "inductor"
    weight_copies = 1.1  # programs saved without weights (bound at load): the weights once, as aoti

    def build(self, graphs: dict[str, GraphExport], engine_dir: Path, graphs_dir: Path) -> dict:
        programs = {n: f"{n}.pt2" for n in GRAPHS if graphs[n].program_path is not None}
        for name, file in programs.items():
            link_or_copy(graphs[name].program_path, engine_dir / file)
        # A graph whose program torch.export cannot save (FlexAttention: export.unsavable) is rebuilt at load from
        # the model's config and bound to the engine's constants like a program's module, then compiled.
        rebuilt = [n for n in GRAPHS if n not in programs]
        return {"programs": programs, "compiled": "at load", **({"rebuilt": rebuilt} if rebuilt else {})}

    def load(self, engine_dir: Path, spec: LoadSpec):
        rebuilt = spec.options.get("rebuilt") or []
        if rebuilt and (spec.constants is None or spec.skeleton_graphs is None):
            raise SvdExportError(f"the engine binds no weights to its rebuilt {rebuilt[0]} graph: rebuild it")
        skeleton = spec.skeleton_graphs() if rebuilt else None

        def compile_one(name: str):
            if name in rebuilt:
                module = with_constants(skeleton[GRAPHS.index(name)],
                                        {k: v.to(spec.device) for k, v in spec.constants(name).items()})
                return compiled_at_load(name, module, spec, [])
            path = spec.file("programs", name, engine_dir)
            program = open_engine_file(path, "a torch.export program", lambda: torch.export.load(str(path)))
            signature = program.graph_signature  # its own input names, before the compile runs it
            check_signature(path, spec.graphs[name].inputs, spec.graphs[name].outputs, list(signature.user_inputs),
                            len(signature.user_outputs))
            # A ranged engine's program has dynamic dimensions: compile for all of them (dynamic=False would
            # specialise and recompile per shape). Dynamo still specialises size 1, so a batch-1 request
            # compiles once more (cached on disk like the rest).
            module = program.module()
            if spec.constants is not None:  # a weightless program: its weights bound from the engine's bindings
                module = with_constants(module, {k: v.to(spec.device) for k, v in spec.constants(name).items()})
            return compiled_at_load(name, module, spec, dynamic_dims(program) if spec.ranged else [])

        return compiled_pair(spec, compile_one)

    fixed_weights = None

    def update_weights(self, graphs: tuple, weights: dict[str, dict[str, torch.Tensor]], spec: LoadSpec) -> None:
        # torch.compile reads the program module's parameters as graph inputs (inlined nn modules, no
        # freezing): new values copied into them take effect without recompiling.
        copy_into_modules({n: g.fn.compiled._orig_mod for n, g in zip(GRAPHS, graphs)}, weights)


def compiled_at_load(name: str, module: torch.nn.Module, spec: LoadSpec, dynamic: list[list[int]]) -> "Inference":
    """`module` compiled by torch.compile, now (so that the first generation is not charged with it); `dynamic`:
    per input, the dimensions a ranged engine's program declares dynamic."""
    compiled = torch.compile(module, dynamic=spec.ranged, fullgraph=True)
    g = spec.graphs[name]
    with torch.inference_mode():  # inference tensors: Inference passes them on as they are, marks included
        inputs = [torch.zeros(s, dtype=getattr(torch, d), device=spec.device)
                  for s, d in zip(g.input_shapes, g.input_dtypes)]
    for tensor, dims in zip(inputs, dynamic):
        for dim in dims:  # dynamic=True alone compiled these inputs' sizes as constants (measured)
            torch._dynamo.mark_dynamic(tensor, dim)
    run = Inference(compiled)
    with phase(f"compiling the {name} graph (Inductor, at load; later loads reuse its on-disk cache)"):
        run(*inputs)
    return run


def dynamic_dims(program) -> list[list[int]]:
    """The dimensions of each user input that the exported program declares dynamic (its symbolic sizes)."""
    from torch.export.graph_signature import InputKind

    names = [i.arg.name for i in program.graph_signature.input_specs if i.kind == InputKind.USER_INPUT]
    values = {n.name: n.meta["val"] for n in program.graph.nodes if n.op == "placeholder"}
    return [[i for i, size in enumerate(values[n].shape) if not isinstance(size, int)] for n in names]


class Inference:
    """A compiled program, always run in inference mode on inference tensors. Dynamo guards on the grad mode
    and on each input's dispatch keys, which differ between tensors made in and out of inference mode: without
    this, the compile at load was repeated by the first generation (which runs in inference mode: two more
    compiles of the full graph, one of the cached) and by a direct call with autograd on (a compile for
    training). Outputs are inference tensors, as every backend's are inside `generate`."""

    def __init__(self, compiled):
        self.compiled = compiled

    def __call__(self, *inputs: torch.Tensor):
        with torch.inference_mode():
            return self.compiled(*(as_inference(t) for t in inputs))


def as_inference(t: torch.Tensor) -> torch.Tensor:
    """`t` as an inference tensor over the same memory (no copy): a tensor DLPack makes in inference mode is
    one. CPU tensors only: a GPU tensor's DLPack hand-over may synchronise streams, which a CUDA-graph capture
    refuses (GPU engines replay captured graphs over fixed buffers instead)."""
    if t.is_inference() or t.device.type != "cpu":
        return t
    return torch.from_dlpack(t.detach())


BACKEND = InductorBackend()
