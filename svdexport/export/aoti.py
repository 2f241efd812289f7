"""AOTInductor: torch.export programs compiled ahead of time into .pt2 packages (CPU or CUDA).

Loading a package extracts its shared library (and, on CUDA, its kernels) into a temporary folder. torch
picks the system temporary folder and leaves it there, so each load is pointed at a `files.Scratch`
folder of its own, removed when the engine is closed, garbage-collected or the process exits (and, for a
killed process, by the next load).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from svdexport.errors import SvdExportError
from svdexport.export import GRAPHS, Backend, GraphExport, LoadSpec, check_signature, compiled_pair, missing_weights
from svdexport.export import open_engine_file
from svdexport.export.aoti_frozen import bind_frozen, compile_frozen, quantization
from svdexport.export.quantize import LORA_REFUSAL, PT2E_X86
from svdexport.files import Scratch
from svdexport.progress import phase
from svdexport.quiet import quiet


class AotiBackend(Backend):
    name = "aoti"
    # Packages hold no weights (bound at load): the build holds them once, plus Inductor's working memory.
    weight_copies = 1.1

    def build(self, graphs: dict[str, GraphExport], engine_dir: Path, graphs_dir: Path) -> dict:
        from torch._inductor import aoti_compile_and_package

        scheme = graphs["full"].quantization
        if scheme is not None and scheme.method == PT2E_X86:  # int8 on a CPU: oneDNN qlinear needs freezing
            return compile_frozen(graphs, engine_dir, scheme)
        record = {"quantization": scheme.to_dict()} if scheme is not None else {}  # torchao: plain constants
        for name in GRAPHS:
            try:
                with phase(f"compiling the {name} graph (AOTInductor)"), quiet():  # quiet: the compilers' warnings
                    aoti_compile_and_package(graphs[name].program, package_path=str(engine_dir / f"{name}.aoti.pt2"),
                                             inductor_configs={"aot_inductor.package_constants_in_so": False})
            except Exception as e:
                raise SvdExportError(f"AOTInductor failed on the {name} graph: {str(e).splitlines()[0]}") from e
        return {"packages": {n: f"{n}.aoti.pt2" for n in GRAPHS}, **record}

    def load(self, engine_dir: Path, spec: LoadSpec):
        from torch._inductor import aoti_load_package

        scratch = Scratch("aoti")

        def one(name: str):
            path = spec.file("packages", name, engine_dir)
            with scratch.as_tmpdir():
                package = open_engine_file(path, "an AOTInductor package", lambda: aoti_load_package(str(path)))
            # Its call spec (pytree of the inputs and outputs) against the manifest's graph, before any call.
            ins, outs = (pytree.treespec_loads(s).num_leaves for s in package.loader.get_call_spec())
            check_signature(path, spec.graphs[name].inputs, spec.graphs[name].outputs, ins, outs)
            if "derived" in spec.options:  # compiled with freezing (a quantized engine): derived constants
                bind_frozen(package, name, spec, engine_dir, path, scratch)
            else:
                bind(package, name, spec)
            return package

        pair = compiled_pair(spec, one)
        for graph in pair:
            graph.scratch = scratch  # lives as long as either graph; Engine.close removes it at once
        return pair

    fixed_weights = None

    def weights_refusal(self, options: dict) -> str | None:
        """A quantized engine's weights are derived at build (int8/fp8, prepacked): no LoRA can be pushed."""
        scheme = quantization(options)
        return None if scheme is None else LORA_REFUSAL.format(scheme=f"{scheme.name}, {scheme.method}")

    def update_weights(self, graphs: tuple, weights: dict[str, dict[str, torch.Tensor]], spec: LoadSpec) -> None:
        """AOTInductor's constant-buffer update: the package's constants are the parameters by FQN (no
        compile-time folding of weights); the changed ones are bound to the new tensors, the rest stay."""
        for name, graph in zip(GRAPHS, graphs):  # both checked before either changes
            missing_weights(name, weights.get(name) or {}, graph.fn.get_constant_fqns())
        for name, graph in zip(GRAPHS, graphs):
            given = weights.get(name) or {}
            if given:
                # Rebound, never copied into: the bound constants may be read-only views of a mapped checkpoint
                # (a copy into them is a segfault, not an error), and the engine's buffers are the user's anyway.
                values = dict(graph.fn.svdexport_constants)
                values.update({k: v.detach().to(spec.device).contiguous() for k, v in given.items()})
                graph.fn.load_constants(values, check_full_update=True, user_managed=True)
                graph.fn.svdexport_constants = values


def bind(package, name: str, spec: LoadSpec) -> None:
    """The package's constants from the engine's bindings, as they are (no copy on the engine's device): a
    package compiled without its constants must never run before they are bound (it would read nothing)."""
    fqns = package.get_constant_fqns()
    bound = spec.constants(name) if spec.constants is not None else {}
    missing = [f for f in fqns if f not in bound]
    if missing:
        raise SvdExportError(f"the engine binds no weight to {missing[0]} of its {name} graph ({len(missing)} in "
                             "all): rebuild it")
    values = {f: bound[f].to(spec.device).contiguous() for f in fqns}
    package.load_constants(values, check_full_update=True, user_managed=True)
    package.svdexport_constants = values  # user-managed: the package reads this memory; it lives as long


BACKEND = AotiBackend()
