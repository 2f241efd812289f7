"""TensorRT through torch-tensorrt (optional extra, CUDA only): each program compiled to a TensorRT
engine and saved as an ExportedProgram that embeds it."""

from __future__ import annotations

from pathlib import Path

import torch

from svdexport.errors import SvdExportError
from svdexport.export import GRAPHS, Backend, GraphExport, LoadSpec, compiled_pair, open_engine_file


# TensorRT's timing cache (the measured speed of each kernel tactic) lives in the engine folder, is listed in
# its manifest, and seeds a rebuild of the same folder (`carried`): a rebuild skips most tactic timing.
TIMING_CACHE = "timing_cache.bin"


def compile_options(engine_dir: Path, dtype: torch.dtype) -> dict:
    """torch_tensorrt.dynamo.compile's settings for one graph: its precision and the folder's timing cache."""
    return {"enabled_precisions": {dtype}, "use_explicit_typing": False,
            "timing_cache_path": str(engine_dir / TIMING_CACHE)}


def profiles(g: GraphExport) -> list[tuple[tuple, tuple, tuple]]:
    """Per input of a ranged graph, TensorRT's optimisation profile (min, opt, max shapes): the smallest and
    largest shapes of the engine's range, optimised for the export example's (the build shapes)."""
    return [(tuple(lo.shape), tuple(a.shape), tuple(hi.shape)) for lo, a, hi in zip(g.min_args, g.args, g.max_args)]


class TensorRTBackend(Backend):
    name = "tensorrt"
    requires = ("torch_tensorrt",)
    extra = "tensorrt"
    weight_copies = 3.5  # export and engine: estimated from the steps, not measured
    carried = (TIMING_CACHE,)
    # torch_tensorrt builds with immutable_weights=True by default, which TensorRT cannot refit; a refittable
    # build (immutable_weights=False) and refit_module_weights from a fused export are not wired up yet.
    fixed_weights = ("its TensorRT engines are built with immutable weights, which TensorRT cannot refit "
                     "(refittable builds are not implemented yet); use the aoti or onnx backend for LoRAs")

    def check(self) -> None:
        super().check()
        if not torch.cuda.is_available():
            raise SvdExportError("backend 'tensorrt' needs a CUDA GPU and none is visible")

    def build(self, graphs: dict[str, GraphExport], engine_dir: Path, graphs_dir: Path) -> dict:
        import torch_tensorrt
        from torch.export.passes import move_to_device_pass

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
                trt = torch_tensorrt.dynamo.compile(program, arg_inputs=inputs, **compile_options(engine_dir, dtype))
                torch_tensorrt.save(trt, str(engine_dir / f"{name}.trt.pt2"), output_format="exported_program",
                                    arg_inputs=args)
            except Exception as e:
                raise SvdExportError(f"TensorRT failed on the {name} graph: {str(e).splitlines()[0]}") from e
        return {"programs": {n: f"{n}.trt.pt2" for n in GRAPHS}, "device": "cuda", "timing_cache": TIMING_CACHE}

    def load(self, engine_dir: Path, spec: LoadSpec):
        import torch_tensorrt  # noqa: F401  (registers the TensorRT runtime ops the programs call)

        def one(name: str):
            path = spec.file("programs", name, engine_dir)
            module = open_engine_file(path, "a TensorRT program", lambda: torch.export.load(str(path)).module())
            return lambda *args: module(*(a.cuda() for a in args))

        return compiled_pair(spec, one)


BACKEND = TensorRTBackend()
