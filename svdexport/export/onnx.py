"""ONNX Runtime: the programs exported to ONNX (graphs folder), optimized into the engine folder.

- Export: torch.onnx's dynamo exporter from the torch.export program, weights as external data (one
  file per graph), which lifts the 2 GB protobuf limit of real FLUX.
- Optimization at build: onnxruntime's transformer optimizer (model type "mmdit", the FLUX/SD3 family);
  at load the session applies every remaining ORT optimization (ORT_ENABLE_ALL) for this machine.
- A ranged engine's programs have dynamic dimensions, which the exporter turns into ONNX dynamic axes
  (symbolic dims named after torch.export's symbols); ORT allocates outputs of dynamic shape itself.
- Sessions are created once per engine, with intra-op threads = the cores this process may use, and run
  with I/O binding on torch tensors: inputs are read in place, outputs are written into torch tensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from svdexport.errors import SvdExportError
from svdexport.export import GRAPHS, Backend, GraphExport, LoadSpec, compiled_pair, missing_weights, open_engine_file
from svdexport.quiet import quiet

# torch dtype <-> ONNX element type (onnx.TensorProto values; ORT binds bfloat16 only by this number).
_ELEM = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16, torch.float64: 11, torch.int64: 7}
_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
          "tensor(double)": torch.float64, "tensor(int64)": torch.int64}


def providers() -> list[str]:
    """TensorRT, then CUDA, then CPU: whatever this onnxruntime build offers, best first."""
    import onnxruntime as ort

    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    available = ort.get_available_providers()
    return [p for p in wanted if p in available]


def session_device(session_providers: list[str]) -> torch.device:
    """Where a session's inputs and outputs live: the GPU when its first provider runs there, else the CPU."""
    on_gpu = session_providers and session_providers[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    return torch.device("cuda", 0) if on_gpu else torch.device("cpu")


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class OrtGraph:
    """One ONNX Runtime session called with positional torch tensors through I/O binding."""

    def __init__(self, path: Path, input_names: list[str]):
        self.path, self.overrides = path, {}
        self._open()
        self.device = session_device(self.session.get_providers())
        position = {n: i for i, n in enumerate(input_names)}
        # The exporter may drop an input the graph does not read; bind only what the session declares.
        self.inputs = [(i.name, position[i.name]) for i in self.session.get_inputs()]
        self.outputs = [(o.name, tuple(o.shape), _TORCH[o.type]) for o in self.session.get_outputs()]

    def _open(self) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = cpu_threads()
        so.inter_op_num_threads = 1  # the graphs are one sequential chain; a second pool only competes
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # ORT's idle threads spin by default; between calls they would take the cores from PyTorch's
        # sampler and predictor work (measured: 2x slower 50-step loops on 2 cores).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Replaced weights (LoRAs): given at session creation, before ORT's own constant folding and weight
        # pre-packing, which then see them. The session reads their memory: kept alive in self.overrides.
        # ORT replaces an initializer stored in the model file with add_initializer, one stored as external data
        # (every large weight) only with add_external_initializers, and refuses the other way round.
        external = [(n, v) for n, (v, _, ext) in self.overrides.items() if ext]
        if external:
            so.add_external_initializers([n for n, _ in external], [v for _, v in external])
        for name, (value, _, ext) in self.overrides.items():
            if not ext:
                so.add_initializer(name, value)
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=providers())
        except Exception as e:
            raise SvdExportError(f"ONNX Runtime cannot load {self.path}: {str(e).splitlines()[0]}") from None

    def replace(self, weights: dict[str, torch.Tensor], external: set[str]) -> None:
        """A new session with these initializers replaced (the others from the engine's files); `external`:
        the names the model stores as external data."""
        import onnxruntime as ort

        for name, value in weights.items():
            t = value.detach().cpu().contiguous()
            array = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
            ortvalue = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, _ELEM[t.dtype])
            self.overrides[name] = (ortvalue, t, name in external)  # t owns the memory the OrtValue reads
        self.session = None  # the old session's memory goes before the new one is made
        self._open()

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        binding = self.session.io_binding()
        keep = []  # tensors whose memory the session reads: alive until the run ends
        for name, pos in self.inputs:
            t = args[pos].to(self.device).contiguous()  # in place where the tensor is already on the device
            keep.append(t)
            binding.bind_input(name, t.device.type, t.device.index or 0, _ELEM[t.dtype], tuple(t.shape), t.data_ptr())
        outs = []
        for name, shape, dtype in self.outputs:
            if not all(isinstance(d, int) for d in shape):  # dynamic axes (a ranged engine): ORT allocates
                binding.bind_output(name, self.device.type, self.device.index or 0)
                outs.append(None)
                continue
            # Fresh outputs each call, on the session's device (no round trip through host memory on a GPU):
            # predictors keep earlier coefficients, so buffers must not be reused.
            o = torch.empty(shape, dtype=dtype, device=self.device)
            binding.bind_output(name, o.device.type, o.device.index or 0, _ELEM[dtype], shape, o.data_ptr())
            outs.append(o)
        self.session.run_with_iobinding(binding)
        if any(o is None for o in outs):  # ORT's own outputs, shared with torch through DLPack (no copy)
            got = binding.get_outputs()
            outs = [torch.from_dlpack(got[i]) if o is None else o for i, o in enumerate(outs)]
        return outs


class OnnxBackend(Backend):
    name = "onnx"
    requires = ("onnx", "onnxscript", "onnxruntime")
    extra = "onnx"
    weight_copies = 4.3  # measured 4.1 on bundled:flux1-reduced (export, optimizer, session), rounded up

    def build(self, graphs: dict[str, GraphExport], engine_dir: Path, graphs_dir: Path) -> dict:
        import logging

        for logger in ("torch.onnx", "onnxscript", "onnx_ir"):
            logging.getLogger(logger).setLevel(logging.ERROR)
        mmdit_log = logging.getLogger("onnxruntime.transformers.onnx_model_mmdit")
        if "CUDAExecutionProvider" not in providers() and _drop_gpu_notice not in mmdit_log.filters:
            mmdit_log.addFilter(_drop_gpu_notice)
        with quiet():  # the exporter's and the optimizer's progress lines; --verbose shows them
            self._build_graphs(graphs, engine_dir, graphs_dir)
        return {"models": {n: f"{n}.onnx" for n in GRAPHS}, "providers": providers(),
                "optimizer": "onnxruntime.transformers mmdit, then ORT_ENABLE_ALL at load",
                "checked": "exported model: onnx.checker and strict shape inference, both from the file path",
                "weights": "initializers named by parameter FQN (replaceable at session creation)",
                "intra_op_threads": "cores available to the process at load"}

    def _build_graphs(self, graphs: dict[str, GraphExport], engine_dir: Path, graphs_dir: Path) -> None:
        import warnings

        from onnxruntime.transformers.optimizer import optimize_model

        heads = None
        for name in GRAPHS:
            g = graphs[name]
            raw = graphs_dir / f"{name}.onnx"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    program = torch.onnx.export(g.program, g.args, input_names=g.input_names,
                                                output_names=g.output_names, dynamo=True, optimize=False,
                                                verbose=False, custom_translation_table=_translations())
                    _optimize_keeping_weights(program, g.program)
                    program.save(str(raw), external_data=True)
            except Exception as e:
                raise SvdExportError(f"ONNX export failed on the {name} graph: {str(e).splitlines()[0]}") from e
            _check(raw)  # the standard ONNX model; the optimized one has ORT's own ops, which ORT checks at load
            heads = heads or _heads(g.module)
            # num_heads/hidden_size 0 lets the optimizer read them from the graph where it can.
            optimized = optimize_model(str(raw), model_type="mmdit", num_heads=heads[0], hidden_size=heads[1],
                                       opt_level=0, use_gpu=False)
            optimized.save_model_to_file(str(engine_dir / f"{name}.onnx"), use_external_data_format=True,
                                         all_tensors_to_one_file=True)

    def load(self, engine_dir: Path, spec: LoadSpec):
        if spec.dtype == "bfloat16" and "CUDAExecutionProvider" not in providers():
            raise SvdExportError("this ONNX engine is bfloat16, which ONNX Runtime runs only on its CUDA and TensorRT "
                                 "providers (the CPU provider has no bfloat16 kernels): run it where onnxruntime-gpu "
                                 "sees a GPU, or build with --dtype fp32")

        def one(name: str) -> OrtGraph:
            path = spec.file("models", name, engine_dir)
            _check_external_data(path, engine_dir, spec)
            return OrtGraph(path, spec.graphs[name].inputs)

        return compiled_pair(spec, one)

    fixed_weights = None

    def update_weights(self, graphs: tuple, weights: dict[str, dict[str, torch.Tensor]], spec: LoadSpec) -> None:
        """ONNX Runtime initializers supplied at session creation, by the parameter FQNs the exporter kept."""
        import onnx

        external = {}
        for name, graph in zip(GRAPHS, graphs):  # both checked before either changes
            initializers = onnx.load(str(graph.fn.path), load_external_data=False).graph.initializer
            missing_weights(name, weights.get(name) or {}, {t.name for t in initializers})
            external[name] = {t.name for t in initializers if t.data_location == onnx.TensorProto.EXTERNAL}
        for name, graph in zip(GRAPHS, graphs):
            if weights.get(name):
                graph.fn.replace(weights[name], external[name])


def _check_external_data(path: Path, engine_dir: Path, spec: LoadSpec) -> None:
    """ONNX Runtime opens the weights files a model names; each must be one the manifest lists, inside the
    engine folder. The model is read without its weights (small even for FLUX)."""
    import onnx

    model = open_engine_file(path, "an ONNX model", lambda: onnx.load(str(path), load_external_data=False))
    prefix = path.parent.relative_to(engine_dir).as_posix() if spec.resolve else ""
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            name = location if prefix in ("", ".") else f"{prefix}/{location}"
            if spec.resolve is not None:
                spec.resolve(name)


def _optimize_keeping_weights(onnx_program, exported) -> None:
    """The exporter's own optimizer (onnxscript), except that no node reading a parameter is constant-folded:
    every weight stays an initializer named by its FQN (ORT folds the transposes at session creation), so a
    LoRA's fused weights can replace it by name. torch.onnx's optimize=True folds small weights' transposes
    into anonymous constants."""
    from onnxscript.optimizer import optimize_ir

    names = set(exported.graph_signature.parameters) | set(exported.graph_signature.buffers)

    def should_fold(node) -> bool | None:
        return False if any(v is not None and v.name in names for v in node.inputs) else None

    optimize_ir(onnx_program.model, should_fold=should_fold)


def _drop_gpu_notice(record) -> bool:
    """The mmdit optimizer asks for onnxruntime-gpu>=1.21 whatever the device; on a CPU-only install the CPU
    provider runs the optimized model (the backend tests do), so the notice only misleads there."""
    return "onnxruntime-gpu" not in record.getMessage()


def _translations() -> dict:
    """Exporter translations for ops whose default ONNX form ONNX Runtime's CPU provider cannot run.

    masked_fill on a bool tensor (HunyuanVideo builds its attention masks that way) becomes a Where over
    bool values, for which ORT's CPU provider has no kernel; through uint8 it runs everywhere.
    """
    import onnx_ir as ir
    from onnxscript import opset18 as op

    def masked_fill(self, mask, value):
        if self.dtype == ir.DataType.BOOL:
            u8 = ir.DataType.UINT8
            return op.Cast(op.Where(mask, op.Cast(value, to=u8), op.Cast(self, to=u8)), to=ir.DataType.BOOL)
        return op.Where(mask, op.CastLike(value, self), self)

    return {torch.ops.aten.masked_fill.Scalar: masked_fill}


def _check(path: Path) -> None:
    """Validates the saved model and infers its shapes from the file path: the in-memory forms of both
    stop at protobuf's 2 GB, which real FLUX graphs exceed (their weights are external data)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
        onnx.shape_inference.infer_shapes_path(str(path), str(path), check_type=True, strict_mode=True)
    except Exception as e:
        raise SvdExportError(f"the exported ONNX model {path.name} is invalid: {str(e).splitlines()[0]}") from e


def _heads(module: torch.nn.Module) -> tuple[int, int]:
    for m in module.modules():
        if hasattr(m, "heads") and hasattr(m, "head_dim"):
            return m.heads, m.heads * m.head_dim
    return 0, 0


BACKEND = OnnxBackend()
