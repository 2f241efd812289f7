"""Backends turn the two graphs into engines. One file per backend, all behind `Backend`.

A build exports both graphs with torch.export (static shapes, or dynamic dimensions over a ranged
engine's shape range; positional tensors) into the graphs
folder; a compiled backend makes its engine files from those programs; `load` gives back two callables
with the eager graphs' calling convention, without constructing the diffusers model. This layer knows
nothing of model families or manifests: what it needs of an engine comes in a `LoadSpec`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from svdexport.errors import SvdExportError, first_line
from svdexport.export.boundary import Boundary
from svdexport.progress import phase
from svdexport.quiet import quiet

BACKENDS = ("eager", "inductor", "aoti", "onnx", "tensorrt")
GRAPHS = ("full", "cached")


@dataclass
class GraphSpec:
    """One graph's calling convention as an engine manifest records it."""

    inputs: list[str]  # positional input names
    outputs: list[str]  # output names
    parameters: int  # distinct parameters the graph holds
    input_shapes: list[list[int]]  # build shapes of the inputs
    input_dtypes: list[str]  # their dtypes ("float32", "bfloat16", "int64", ...)


@dataclass
class LoadSpec:
    """What a backend needs to load an engine folder."""

    graphs: dict[str, GraphSpec]  # "full" and "cached"
    dtype: str  # the engine's precision ("float32", "bfloat16", ...)
    device: str  # "cpu" or "cuda"
    eager_graphs: Callable[[], tuple] | None = None  # builds the eager graphs from the weights (eager backend)
    # An engine file by its manifest-listed name (backend_options names them), confined to the engine folder;
    # backends open nothing else. None only for engines assembled in memory.
    resolve: Callable[[str], Path] | None = None
    options: dict = field(default_factory=dict)  # the backend's own record from build (its file names)
    ranged: bool = False  # the programs take a range of shapes (dynamic dimensions), not one
    # A graph's constants by FQN, bound at load (export/bindings.py: views of the referenced checkpoint and the
    # engine's own constants file); None for engines whose programs hold their weights (eager, older builds).
    constants: Callable[[str], dict[str, torch.Tensor]] | None = None
    # Refuses an engine file written in place since it was hashed (what `resolve` names may then differ from
    # what was hashed); backends that read engine files again after the load (a refit) call it after the read.
    unchanged: Callable[[], None] | None = None
    # Builds the graphs from the model's config alone, every weight on the meta device (bound at load by name):
    # what a backend compiles where the engine holds no program of a graph (inductor with sparse attention).
    skeleton_graphs: Callable[[], tuple] | None = None

    def file(self, kind: str, graph: str, engine_dir: Path) -> Path:
        """The file of `graph` that backend_options[kind] names, through the manifest's resolver."""
        names = self.options.get(kind)
        if not isinstance(names, dict) or not isinstance(names.get(graph), str):
            raise SvdExportError(f"the engine's manifest names no {kind} file for the {graph} graph")
        if self.resolve is None:
            return engine_dir / names[graph]
        return self.resolve(names[graph])

    def check_unchanged(self) -> None:
        if self.unchanged is not None:
            self.unchanged()


@dataclass
class GraphExport:
    """One graph as a backend receives it."""

    module: torch.nn.Module  # the eager graph (shares the transformer's weights)
    args: tuple  # example positional inputs with the build shapes
    input_names: list[str]  # names of the positional inputs, in order
    output_names: list[str]  # names of the outputs, in order
    program: object = None  # torch.export.ExportedProgram, for backends that compile from it
    program_path: Path | None = None  # where that program was saved (graphs folder)
    # A ranged engine's inputs at its smallest and largest shapes (None: static); a dimension that differs
    # between them is dynamic in the exported program (torch.export Dim), the ONNX model and TensorRT's profile.
    min_args: tuple | None = None
    max_args: tuple | None = None
    # export/quantize.QuantScheme of a quantized graph (`build --quantize`: its module's linears are int8/fp8)
    quantization: object = None

    def dynamic_shapes(self) -> tuple | None:
        """torch.export's dynamic_shapes: per input, {dim: Dim.DYNAMIC(min, max)} for the dims that vary."""
        if self.min_args is None:
            return None
        from torch.export import Dim

        specs = []
        for lo, hi in zip(self.min_args, self.max_args):
            # torch.export specialises sizes 0 and 1 (a batch 1..2 traced at 2 would be pinned to 2): the
            # program's upper bound is at least 3; the engine's own range check keeps requests in range.
            dims = {d: Dim.DYNAMIC(min=a, max=max(b, 3)) for d, (a, b) in enumerate(zip(lo.shape, hi.shape)) if a != b}
            specs.append(dims or None)
        return tuple(specs)


class CompiledGraph:
    """Adapts a compiled callable to the eager graphs' convention: a tuple for several outputs, else a tensor.
    `boundary` (export/boundary.py) makes the inputs what the compiled code reads: contiguous, in the exported
    dtypes, on the engine's device."""

    scratch = None  # a files.Scratch the loader extracted into (AOTInductor), removed by close()

    def __init__(self, fn: Callable, input_names: list[str], output_names: list[str], boundary: Boundary):
        self.fn, self.input_names, self.output_names = fn, list(input_names), list(output_names)
        self.boundary = boundary

    def close(self) -> None:
        if self.scratch is not None:
            self.scratch.remove()

    def __call__(self, *inputs: torch.Tensor):
        out = self.fn(*self.boundary(inputs))
        if isinstance(out, torch.Tensor):
            out = (out,)
        return tuple(out) if len(self.output_names) > 1 else out[0]


class Backend:
    """Builds engine files and loads them back."""

    name = ""
    needs_export = True  # whether build must torch.export the graphs first
    requires: tuple[str, ...] = ()  # importable modules the backend needs
    extra = ""  # the pip extra that installs them
    # Peak build memory / weight bytes: how many copies of the weights the build holds at once (measured for
    # aoti and onnx on bundled:flux1-reduced, see build/memory.py; estimated from the steps elsewhere).
    weight_copies = 1.3
    carried: tuple[str, ...] = ()  # files of an engine folder that its rebuild starts from (caches), if present

    def check(self) -> None:
        """Raises SvdExportError in one line when the backend cannot run here."""
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            raise SvdExportError(f"backend {self.name!r} needs {', '.join(missing)}, which is not installed "
                                 f"(pip install 'svdexport[{self.extra}]')")

    def build(self, graphs: dict[str, GraphExport], engine_dir: Path, graphs_dir: Path) -> dict:
        """Writes this backend's files into engine_dir (and exports into graphs_dir); returns manifest notes."""
        raise NotImplementedError

    def load(self, engine_dir: Path, spec: LoadSpec):
        """(full graph, cached graph) ready to call."""
        raise NotImplementedError

    # Why this backend's loaded graphs cannot take new weights (None: `update_weights` does it).
    fixed_weights: str | None = "it has no way to replace a compiled engine's weights"

    def weights_refusal(self, options: dict) -> str | None:
        """Why an engine of this backend, whose manifest records `options` (backend_options), cannot take new
        weights; None when it can. Per engine, not only per backend: engines an older build made may not."""
        return self.fixed_weights

    def update_weights(self, graphs: tuple, weights: dict[str, dict[str, torch.Tensor]], spec: LoadSpec) -> None:
        """Replaces weights of the loaded (full, cached) graphs in place, without recompiling them: `weights`
        maps a graph name to {parameter FQN in that graph: new value}; FQNs not given keep their values."""
        raise SvdExportError(f"backend {self.name!r} cannot load a LoRA into a built engine: {self.fixed_weights}")


def missing_weights(name: str, given, known) -> None:
    """Refuses, in one line, weights a compiled graph does not hold under their parameter names."""
    missing = sorted(set(given) - set(known))
    if missing:
        raise SvdExportError(f"the {name} graph of this engine holds no weight named {missing[0]} (and "
                             f"{len(missing) - 1} more): the compiler folded it into a derived constant, so "
                             "new weights cannot be pushed into it; rebuild the engine with this svdexport")


def open_engine_file(path: Path, what: str, opener: Callable[[], object]):
    """`opener()`, with whatever a damaged file makes the loader raise turned into one line naming the file
    (its hash matched the manifest, so the file was written that way: rebuild or re-copy the engine)."""
    try:
        return opener()
    except SvdExportError:
        raise
    except Exception as e:
        first = first_line(e)
        shown = getattr(path, "origin", path)  # a verified file's own path, not its link (verified.VerifiedPath)
        raise SvdExportError(f"cannot load {shown} as {what}: {first}") from None


def check_signature(path: Path, inputs: list[str], outputs: list[str] | None, got_inputs: list[str] | int,
                    got_outputs: list[str] | int | None = None) -> None:
    """Refuses, in one line at load, an engine file that does not take the inputs (and give the outputs) of
    the graph it is loaded as: the full and cached files swapped, or another engine's. `got_*`: the file's own
    names where it records them (a subset: an exporter may drop an input its graph does not read), else counts."""
    def fits(want: list[str], got) -> bool:
        return got == len(want) if isinstance(got, int) else bool(got) and set(got) <= set(want)

    def shown(x, what: str) -> str:
        return f"{x} {what}" if isinstance(x, int) else f"{what} {', '.join(x)}"

    outputs_fit = outputs is None or got_outputs is None or fits(outputs, got_outputs)
    if not fits(inputs, got_inputs) or not outputs_fit:
        got = shown(got_inputs, "inputs")
        got += "" if got_outputs is None else f" and gives {shown(got_outputs, 'outputs')}"
        raise SvdExportError(f"engine file {getattr(path, 'origin', path)} is not the graph its manifest loads it "
                             f"as (it takes {got}; the graph takes inputs {', '.join(inputs)} and gives "
                             f"{len(outputs or [])} outputs): the engine's files were swapped or replaced; rebuild it")


def backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise SvdExportError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    from importlib import import_module

    return import_module(f"svdexport.export.{name}").BACKEND


def compiled_pair(spec: LoadSpec, load_one: Callable[[str], Callable]) -> tuple[CompiledGraph, CompiledGraph]:
    """(full, cached) from a per-graph loader, with names from the engine's graph specs, each behind the input
    boundary of its exported dtypes and the engine's device."""
    return tuple(CompiledGraph(load_one(n), spec.graphs[n].inputs, spec.graphs[n].outputs,
                               Boundary(spec.graphs[n].input_dtypes, spec.device)) for n in GRAPHS)


def export_programs(graphs: dict[str, GraphExport], graphs_dir: Path) -> None:
    """torch.export both graphs (static shapes, or dynamic dimensions for a ranged engine) and save the
    programs to graphs_dir/NAME.pt2 without their weights (`weightless`: the engine binds them at load)."""
    graphs_dir.mkdir(parents=True, exist_ok=True)
    for name, g in graphs.items():
        with phase(f"exporting the {name} graph (torch.export)"):
            try:
                with quiet():  # the exporter's warnings; --verbose shows them
                    g.program = torch.export.export(g.module, g.args, dynamic_shapes=g.dynamic_shapes(), strict=False)
            except Exception as e:  # an exporter failure is a design bug; name the graph that hit it
                raise SvdExportError(f"torch.export failed on the {name} graph: {str(e).splitlines()[0]}") from e
            why = unsavable(g.program)
            if why is not None:  # compiled from memory; the folder says why its program is not there
                (graphs_dir / f"{name}.not-saved.txt").write_text(f"{name}.pt2 is not saved: {why}\n")
                continue
            g.program_path = graphs_dir / f"{name}.pt2"
            with quiet():
                torch.export.save(weightless(g.program), g.program_path)


def unsavable(program) -> str | None:
    """Why torch.export.save cannot write `program` (None: it can): torch 2.13 serialises no flex_attention node
    (sparse attention, docs/sparse.md), for any mask."""
    flex = torch.ops.higher_order.flex_attention
    if any(n.op == "call_function" and n.target is flex for n in program.graph.nodes):
        return f"it holds FlexAttention, which torch {torch.__version__} cannot serialise (torch.export.save)"
    return None


def weightless(program):
    """`program` with every constant on the meta device: the graph, signature and shapes without a byte of
    weights (bound again at load with `with_constants`)."""
    def meta(t):
        if not isinstance(t, torch.Tensor):
            return t
        m = torch.empty(t.shape, dtype=t.dtype, device="meta")
        return torch.nn.Parameter(m, requires_grad=False) if isinstance(t, torch.nn.Parameter) else m

    return torch.export.ExportedProgram(
        root=program.graph_module, graph=program.graph, graph_signature=program.graph_signature,
        state_dict={k: meta(v) for k, v in program.state_dict.items()},
        range_constraints=program.range_constraints, module_call_graph=program.module_call_graph,
        example_inputs=program.example_inputs, constants={k: meta(v) for k, v in program.constants.items()},
        verifiers=program.verifiers)


def program_with(program, constants: dict[str, torch.Tensor]):
    """A (weightless) program whose state dict and lifted constants are `constants` (by FQN, as they are: no
    copy), for consumers that take a whole program (TensorRT's refit)."""
    missing = [k for k in (*program.state_dict, *program.constants) if k not in constants]
    if missing:
        raise SvdExportError(f"the engine binds no weight to {missing[0]} ({len(missing)} in all): rebuild it")

    def given(k, t):
        value = constants[k]
        return torch.nn.Parameter(value, requires_grad=False) if isinstance(t, torch.nn.Parameter) else value

    return torch.export.ExportedProgram(
        root=program.graph_module, graph=program.graph, graph_signature=program.graph_signature,
        state_dict={k: given(k, v) for k, v in program.state_dict.items()},
        range_constraints=program.range_constraints, module_call_graph=program.module_call_graph,
        example_inputs=program.example_inputs,
        constants={k: given(k, v) if isinstance(v, torch.Tensor) else v for k, v in program.constants.items()},
        verifiers=program.verifiers)


def with_constants(module: torch.nn.Module, constants: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A weightless program's module (`program.module()`) with its constants bound (assigned, no copy)."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for fqn, value in constants.items():
            owner, _, leaf = fqn.rpartition(".")
            target = module.get_submodule(owner) if owner else module
            if fqn in params:
                setattr(target, leaf, torch.nn.Parameter(value, requires_grad=False))
            else:
                setattr(target, leaf, value)
    missing = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if missing:
        raise SvdExportError(f"the engine binds no weight to {missing[0]} ({len(missing)} in all): rebuild it")
    return module


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where possible, so engines and graphs do not hold two copies of the weights."""
    import os
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
