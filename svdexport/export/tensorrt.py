"""TensorRT through torch-tensorrt (optional extra, CUDA only): each program compiled to a TensorRT
engine and saved as an ExportedProgram that embeds it.

Weights are bound at load, as for every compiled backend (export/bindings.py): the engines are built
refittable and, where torch-tensorrt can, weight-stripped (`strip_engine_weights`: the saved engine holds no
weights), and the engine folder keeps each graph's torch.export program without weights (hard-linked from the
graphs folder where the filesystem allows). Loading binds the engine's constants (views of the referenced
checkpoint, on the GPU) into that program and hands it to torch_tensorrt.dynamo.refit_module_weights, which
maps its weights onto the engine's and refits them. A LoRA is one more refit with the changed values on top
(every weight of the engine comes from the program: hence the full program, not only the changed weights).
The files on disk stay as built; the refitted engines live in memory.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

import torch

from svdexport.errors import SvdExportError, first_line
from svdexport.export import (GRAPHS, Backend, GraphExport, LoadSpec, compiled_pair, link_or_copy,
                              missing_weights, open_engine_file, program_with)


# TensorRT's timing cache (the measured speed of each kernel tactic) lives in the engine folder, is listed in
# its manifest, and seeds a rebuild of the same folder (`carried`): a rebuild skips most tactic timing.
TIMING_CACHE = "timing_cache.bin"

# What an engine without the manifest's "refittable" flag says to a LoRA: built before refit was wired up,
# or by a torch-tensorrt without it (older than 2.5).
IMMUTABLE = ("this engine's TensorRT engines were built with immutable weights, which TensorRT cannot refit: "
             "rebuild it with this svdexport (and torch-tensorrt >= 2.5) to load LoRAs")


def refit_options(compile_fn: Callable) -> dict | None:
    """The keyword of torch_tensorrt.dynamo.compile that builds refittable engines, read from its signature
    (the name changed, and compile takes **kwargs, so a wrong name would be ignored, not refused):
    torch-tensorrt 2.6 and later take `immutable_weights` (default True; passing the deprecated
    `make_refittable` there raises); 2.5, refit's first release, took `make_refittable` (default False).
    None: this torch-tensorrt cannot build refittable engines."""
    params = inspect.signature(compile_fn).parameters
    if "immutable_weights" in params:
        return {"immutable_weights": False}
    if "make_refittable" in params:
        return {"make_refittable": True}
    return None


def refit_available(torch_tensorrt) -> dict | None:
    """`refit_options` for the installed torch-tensorrt, or None where it has no refit: no refit_module_weights,
    or its feature flag off (some releases disable refit on Python 3.13)."""
    features = getattr(torch_tensorrt, "ENABLED_FEATURES", None)
    if not getattr(features, "refit", True) or not hasattr(torch_tensorrt.dynamo, "refit_module_weights"):
        return None
    return refit_options(torch_tensorrt.dynamo.compile)


def strip_options(compile_fn: Callable, refit: dict | None) -> dict:
    """`strip_engine_weights` where this torch-tensorrt has it (2.6 and later) and the engines are refittable:
    the serialized engine then holds no weights (bound by a refit at load)."""
    params = inspect.signature(compile_fn).parameters
    return {"strip_engine_weights": True} if refit is not None and "strip_engine_weights" in params else {}


def compile_options(engine_dir: Path, dtype: torch.dtype, refit: dict | None = None) -> dict:
    """torch_tensorrt.dynamo.compile's settings for one graph: its precision, the folder's timing cache and,
    where the installed version has it, refittable engines.

    Cost of refittable engines, documented not measured (no GPU has run this yet): torch-tensorrt's
    CompilationSettings reference says immutable weights let TensorRT apply more aggressive weight fusing, so a
    refittable engine may run slower; TensorRT 11.3's refit page lists a known issue where REFIT drops a GEMM
    bias even without a refit (its parity against eager is checked by scripts/gpu_check.py)."""
    return {"enabled_precisions": {dtype}, "use_explicit_typing": False,
            "timing_cache_path": str(engine_dir / TIMING_CACHE), **(refit or {})}


def build_record(refittable: bool) -> dict:
    """The manifest's backend_options: the TensorRT programs, and for refittable engines the torch.export
    programs a refit reads its weights from."""
    record = {"programs": {n: f"{n}.trt.pt2" for n in GRAPHS}, "device": "cuda", "timing_cache": TIMING_CACHE,
              "refittable": refittable}
    if refittable:
        record["exported"] = {n: f"{n}.pt2" for n in GRAPHS}
    return record


def profiles(g: GraphExport) -> list[tuple[tuple, tuple, tuple]]:
    """Per input of a ranged graph, TensorRT's optimisation profile (min, opt, max shapes): the smallest and
    largest shapes of the engine's range, optimised for the export example's (the build shapes)."""
    return [(tuple(lo.shape), tuple(a.shape), tuple(hi.shape)) for lo, a, hi in zip(g.min_args, g.args, g.max_args)]


def with_weights(program, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Puts `values` (parameter FQN -> tensor) into the torch.export program's state dict (its own devices and
    dtypes), replacing the entries, never writing into the tensors they held (the engine's bound weights, which
    the next refit starts from again); returns those of `values` that differ from what the program held, as
    given (not the device copies: what a later refit must apply again, kept off the GPU)."""
    state = program.state_dict
    differ = {}
    with torch.no_grad():
        for fqn, value in values.items():
            target = state[fqn]
            moved = value.to(target.device, target.dtype)
            if target.is_meta or not torch.equal(target, moved):
                differ[fqn] = value
            state[fqn] = torch.nn.Parameter(moved, requires_grad=False) if isinstance(target, torch.nn.Parameter) \
                else moved
    return differ


class TrtGraph:
    """One loaded TensorRT program; `refit` replaces it by one whose engines hold other weights."""

    def __init__(self, module: torch.nn.Module, exported: Path | None, device: str = "cuda",
                 unchanged: Callable[[], None] | None = None,
                 constants: Callable[[], dict[str, torch.Tensor]] | None = None):
        self.module = module
        self.constants = constants  # the graph's bound weights (LoadSpec.constants): its program has none
        self.exported = exported  # the graph's torch.export program in the engine folder (refittable engines)
        self.unchanged = unchanged  # LoadSpec.unchanged: refuses a program written in place since the load hashed it
        self.device = device  # where the refit's program goes: the engines' device, as the build compiled it
        self.changed: dict[str, torch.Tensor] = {}  # weights now in the engines that differ from that program's

    def __call__(self, *args: torch.Tensor):
        return self.module(*(a.cuda() for a in args))

    def refit(self, name: str, given: dict[str, torch.Tensor], refit_fn: Callable) -> None:
        """The engines refitted with the program's weights, the earlier changes and `given`. The program is
        read from disk for each refit and dropped after it (no copy of the weights is kept); torch-tensorrt's
        refit of a saved program (an inlined module) is not in place: it returns a module with new engines."""
        from torch.export.passes import move_to_device_pass

        path = self.exported
        # Out of inference mode (bench and gpu_check push under it): the refit re-runs torch.export's
        # decompositions on the program, which want ordinary tensors, not inference tensors.
        with torch.inference_mode(False):
            program = open_engine_file(path, "a torch.export program", lambda: torch.export.load(str(path)))
            if self.unchanged is not None:
                self.unchanged()
            missing_weights(name, given, program.state_dict)
            if self.constants is not None:  # a weightless program: the engine's bound weights, on the GPU
                program = program_with(program, {k: v.to(self.device) for k, v in self.constants().items()})
            changed = with_weights(program, {**self.changed, **given})
            try:
                module = refit_fn(compiled_module=self.module, in_place=False,
                                  new_weight_module=move_to_device_pass(program, self.device))
            except Exception as e:
                first = first_line(e)
                raise SvdExportError(f"TensorRT refit failed on the {name} graph: {first}") from e
        self.module, self.changed = module, changed


class TensorRTBackend(Backend):
    name = "tensorrt"
    requires = ("torch_tensorrt",)
    extra = "tensorrt"
    # The weights on the GPU once, plus TensorRT's builder (it holds the weights it times kernels with): an
    # estimate, not measured (no GPU has run this backend yet).
    weight_copies = 1.5
    carried = (TIMING_CACHE,)
    fixed_weights = None  # per engine: `weights_refusal`

    def check(self) -> None:
        super().check()
        if not torch.cuda.is_available():
            raise SvdExportError("backend 'tensorrt' needs a CUDA GPU and none is visible")

    def weights_refusal(self, options: dict) -> str | None:
        return None if options.get("refittable") is True else IMMUTABLE

    def build(self, graphs: dict[str, GraphExport], engine_dir: Path, graphs_dir: Path) -> dict:
        import torch_tensorrt
        from torch.export.passes import move_to_device_pass

        refit = refit_available(torch_tensorrt)
        for name in GRAPHS:
            g = graphs[name]
            args = tuple(a.cuda() for a in g.args)
            program = move_to_device_pass(g.program, "cuda")
            dtype = next(a.dtype for a in args if a.is_floating_point())
            inputs = args
            if g.min_args is not None:  # a ranged engine: one optimisation profile (min / opt / max) per input
                inputs = [torch_tensorrt.Input(min_shape=lo, opt_shape=opt, max_shape=hi, dtype=a.dtype)
                          for a, (lo, opt, hi) in zip(args, profiles(g))]
            try:
                trt = torch_tensorrt.dynamo.compile(program, arg_inputs=inputs,
                                                    **compile_options(engine_dir, dtype, refit),
                                                    **strip_options(torch_tensorrt.dynamo.compile, refit))
                torch_tensorrt.save(trt, str(engine_dir / f"{name}.trt.pt2"), output_format="exported_program",
                                    arg_inputs=args)
            except Exception as e:
                raise SvdExportError(f"TensorRT failed on the {name} graph: {str(e).splitlines()[0]}") from e
            if refit is None:
                raise SvdExportError("this torch-tensorrt cannot refit engines (torch-tensorrt >= 2.5 with refit "
                                     "enabled is needed): svdexport binds an engine's weights at load by a refit")
            link_or_copy(g.program_path, engine_dir / f"{name}.pt2")  # weightless: the refit's graph
        return build_record(True)

    def load(self, engine_dir: Path, spec: LoadSpec):
        import torch_tensorrt  # noqa: F401  (registers the TensorRT runtime ops the programs call)

        refittable = self.weights_refusal(spec.options) is None

        def one(name: str) -> TrtGraph:
            path = spec.file("programs", name, engine_dir)
            module = open_engine_file(path, "a TensorRT program", lambda: torch.export.load(str(path)).module())
            bound = None if spec.constants is None else (lambda: spec.constants(name))
            graph = TrtGraph(module, spec.file("exported", name, engine_dir) if refittable else None,
                             unchanged=spec.check_unchanged, constants=bound)
            if graph.constants is not None:  # a weight-stripped engine: its weights first, by a refit
                from torch_tensorrt.dynamo import refit_module_weights

                graph.refit(name, {}, refit_module_weights)
            return graph

        return compiled_pair(spec, one)

    def update_weights(self, graphs: tuple, weights: dict[str, dict[str, torch.Tensor]], spec: LoadSpec) -> None:
        """TensorRT refit of each graph that has new weights, one graph after the other: each refit reads that
        graph's program (a copy of its weights on the GPU while it runs), so the names are checked per graph,
        not both before either changes as the other backends do; they only differ for an engine of another
        svdexport, which an immutable one is."""
        refusal = self.weights_refusal(spec.options)
        if refusal is not None:
            raise SvdExportError(f"backend 'tensorrt' cannot load a LoRA into this engine: {refusal}")
        from torch_tensorrt.dynamo import refit_module_weights

        for name, graph in zip(GRAPHS, graphs):
            given = weights.get(name) or {}
            if given:
                graph.fn.refit(name, given, refit_module_weights)


BACKEND = TensorRTBackend()
