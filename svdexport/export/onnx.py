"""ONNX Runtime: the programs exported to ONNX (graphs folder), optimized into the engine folder.

- Export (onnx_export.py): torch.onnx's dynamo exporter from the torch.export program; every weight is a graph
  input named by its FQN, typed and shaped, without its bytes: neither folder holds a copy of the weights. At
  load each session's weights are the engine's bound tensors (LoadSpec.constants: views of the mapped
  checkpoint, or of the engine's constants file for bundled and --embed-weights engines), given by I/O binding,
  which ONNX Runtime reads in place (moved once to the GPU where the session runs there); a LoRA rebinds them.
  Engines built before bindings keep their weights as initializers in NAME.onnx.data files (ModelFiles).
- bf16 on a CPU: bf16 weights (the checkpoint's bytes) cast to float32 where they are used, float32
  activations (backend_options "compute": "float32" and the input dtypes the sessions take).
- Optimization at build: onnxruntime's transformer optimizer (model type "mmdit", the FLUX/SD3 family); at load
  the session applies every remaining ORT optimization (ORT_ENABLE_ALL) for this machine: weights that are
  inputs are never constant-folded or prepacked, so no optimization copies them.
- A ranged engine's programs have dynamic dimensions, which the exporter turns into ONNX dynamic axes
  (symbolic dims named after torch.export's symbols); ORT allocates outputs of dynamic shape itself.
- Sessions are created once per engine, with intra-op threads = the cores this process may use, and run
  with I/O binding on torch tensors: inputs are read in place, outputs are written into torch tensors.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
from pathlib import Path
from typing import Callable

import torch

from svdexport.errors import SvdExportError
from svdexport.export import GRAPHS, Backend, GraphExport, LoadSpec, check_signature, compiled_pair, missing_weights
from svdexport.export import open_engine_file
from svdexport.export import onnx_export as exported
from svdexport.progress import phase
from svdexport.quiet import quiet

# torch dtype <-> ONNX element type (onnx.TensorProto values; ORT binds bfloat16 only by this number).
_ELEM = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16, torch.float64: 11, torch.int64: 7, torch.int32: 6,
         torch.uint8: 2, torch.int8: 3, torch.bool: 9}
_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
          "tensor(double)": torch.float64, "tensor(int64)": torch.int64, "tensor(int32)": torch.int32,
          "tensor(uint8)": torch.uint8, "tensor(int8)": torch.int8, "tensor(bool)": torch.bool}
# Bytes per element of the ONNX element types external data may hold (float, uint8, int8, uint16, int16,
# int32, int64, bool, float16, double, uint32, uint64, bfloat16).
_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


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


class ModelFiles:
    """An ONNX model read once: its bytes, and each external initializer (engines built before bindings) as an
    array over a read-only mapping of its data file. Sessions are made from these, never from the paths: ONNX
    Runtime resolves a model's folder to its real path to find the weights, so from the path it would read
    whatever is there now, not the engine's verified files (`resolve`: an external-data location to the path to
    read it from; default: beside the model)."""

    def __init__(self, path: Path, resolve: Callable[[str], Path] | None = None):
        import onnx

        self.bytes = Path(path).read_bytes()
        model = onnx.load_model_from_string(self.bytes)
        self.names = {t.name for t in model.graph.initializer}  # every initializer (weights replaceable by name)
        self.external: dict[str, object] = {}  # name -> OrtValue over the mapping, for those stored as external data
        self._arrays, maps = [], {}
        for tensor in onnx.external_data_helper._get_all_tensors(model):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in tensor.external_data}
            location = info.get("location", "")
            file = resolve(location) if resolve is not None else Path(path).parent / location
            if file not in maps:
                maps[file] = _map(file)
            self.external[tensor.name] = self._value(tensor, info, maps[file], path)

    def _value(self, tensor, info: dict, data, path: Path):
        import numpy as np
        import onnxruntime as ort

        size = _ITEMSIZE.get(tensor.data_type)
        if tensor.name not in self.names or size is None:
            raise SvdExportError(f"{getattr(path, 'origin', path)} stores {tensor.name!r} as external data in a form "
                                 "svdexport does not load (not a graph initializer of a numeric type); rebuild it")
        numel = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
        offset, length = int(info.get("offset", 0)), int(info.get("length", numel * size))
        if length != numel * size or offset < 0 or offset + length > len(data):
            raise SvdExportError(f"{getattr(path, 'origin', path)}: the external data of {tensor.name!r} does not "
                                 "fit its data file (offset, length or shape); rebuild the engine")
        # Raw bytes of the element's size, reinterpreted by ORT as the ONNX type (numpy has no bfloat16).
        array = np.frombuffer(data, dtype=f"u{size}", count=numel, offset=offset).reshape(tuple(tensor.dims))
        self._arrays.append(array)  # the session reads this memory: alive as long as the model
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, tensor.data_type)


def _ortvalue(t: torch.Tensor) -> tuple[object, torch.Tensor]:
    """An OrtValue over a CPU tensor's memory (no copy where it is contiguous), and the tensor that owns it."""
    import onnxruntime as ort

    t = t.detach().cpu().contiguous()
    array = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()  # numpy has no bfloat16
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, _ELEM[t.dtype]), t


def _map(path: Path) -> bytes | mmap.mmap:
    """A file's bytes as a read-only mapping (the pages of multi-GB weights are read as ORT touches them)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)


class OrtGraph:
    """One ONNX Runtime session called with positional torch tensors through I/O binding. Its other inputs are its
    weights, each bound to the tensor of its name in `bound` (LoadSpec.constants); `resolve` and `unchanged`:
    see ModelFiles and LoadSpec.unchanged."""

    def __init__(self, path: Path, input_names: list[str], resolve: Callable[[str], Path] | None = None,
                 unchanged: Callable[[], None] | None = None, bound: dict[str, torch.Tensor] | None = None):
        self.path, self.overrides, self.unchanged = path, {}, unchanged
        self.model = open_engine_file(path, "an ONNX model", lambda: ModelFiles(path, resolve))
        self._open()
        self.device = session_device(self.session.get_providers())
        position = {n: i for i, n in enumerate(input_names)}
        declared = self.session.get_inputs()
        weights = [i for i in declared if i.name not in position and i.name in (bound or {})]
        # The exporter may drop an input the graph does not read; bind only what the session declares. An input
        # neither the graph's nor a bound weight: another graph's model (the files swapped).
        check_signature(path, input_names, None, [i.name for i in declared if i not in weights])
        self._declared = {i.name: (i.type, list(i.shape)) for i in weights}
        self.weights = {i.name: self._weight(i.name, bound[i.name]) for i in weights}
        self.inputs = [(i.name, position[i.name]) for i in declared if i not in weights]
        self.outputs = [(o.name, tuple(o.shape), _TORCH[o.type]) for o in self.session.get_outputs()]

    @property
    def names(self) -> set[str]:
        """The weights a LoRA may replace: bound inputs, or initializers (engines built before bindings)."""
        return set(self.weights) | self.model.names

    def _weight(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """`t` as the session reads it in place: on its device (one copy to a GPU; none on a CPU), contiguous."""
        kind, shape = self._declared[name]
        if _TORCH.get(kind) != t.dtype or shape != list(t.shape):
            raise SvdExportError(f"the engine binds a {t.dtype} {list(t.shape)} tensor to {name} of "
                                 f"{getattr(self.path, 'origin', self.path)}, which takes {kind} {shape}: rebuild it")
        return t.detach().to(self.device).contiguous()

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
        # Initializers (engines built before bindings) and their replacements (LoRAs): given at session creation,
        # before ORT's own constant folding and weight pre-packing, which then see them (ORT copies them). The
        # session reads their memory: kept alive in self.overrides. ORT replaces an initializer stored in the
        # model file with add_initializer, one stored as external data (every large weight) only with
        # add_external_initializers, and refuses the other way round. Every external initializer is given so
        # (ModelFiles): ORT opens no file.
        external = {**self.model.external, **{n: v for n, (v, _, ext) in self.overrides.items() if ext}}
        if external:
            so.add_external_initializers(list(external), list(external.values()))
        for name, (value, _, ext) in self.overrides.items():
            if not ext:
                so.add_initializer(name, value)
        try:
            self.session = ort.InferenceSession(self.model.bytes, so, providers=providers())
        except Exception as e:
            raise SvdExportError(f"ONNX Runtime cannot load {getattr(self.path, 'origin', self.path)}: "
                                 f"{str(e).splitlines()[0]}") from None

    def replace(self, weights: dict[str, torch.Tensor]) -> None:
        """These weights replaced: a bound input is bound to the new tensor; initializers (engines built before
        bindings) need a new session, the others taken from the engine's files again."""
        for name in [n for n in weights if n in self.weights]:
            self.weights[name] = self._weight(name, weights.pop(name))
        if not weights:
            return
        for name, value in weights.items():
            ortvalue, t = _ortvalue(value)
            self.overrides[name] = (ortvalue, t, name in self.model.external)  # t owns the memory ORT reads
        self.session = None  # the old session's memory goes before the new one is made
        self._open()
        if self.unchanged is not None:  # the mapped weights are the engine's files: not written in place since
            self.unchanged()

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        binding = self.session.io_binding()
        for name, t in self.weights.items():  # read in place, as they are (the engine keeps them alive)
            binding.bind_input(name, t.device.type, t.device.index or 0, _ELEM[t.dtype], tuple(t.shape), t.data_ptr())
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
    # The models hold no weights: the build holds them once (export, check and optimizer add 0.05 GiB). Measured
    # at 256x256, text 64 (/usr/bin/time -v, whole-process peak RSS over weight bytes): 1.20 for
    # bundled:flux1-reduced in fp32 (4.60 of 3.83 GiB), 1.42 for it as a local bf16 folder with --dtype bf16 (2.70
    # of 1.91 GiB: Python and the calibration's activations on top); 4.1 before. Sessions copy nothing at load.
    weight_copies = 1.1

    def build(self, graphs: dict[str, GraphExport], engine_dir: Path, graphs_dir: Path) -> dict:
        import logging

        for logger in ("torch.onnx", "onnxscript", "onnx_ir"):
            logging.getLogger(logger).setLevel(logging.ERROR)
        mmdit_log = logging.getLogger("onnxruntime.transformers.onnx_model_mmdit")
        if "CUDAExecutionProvider" not in providers() and _drop_gpu_notice not in mmdit_log.filters:
            mmdit_log.addFilter(_drop_gpu_notice)
        in_float32 = exported.float32_compute(graphs)
        dtypes = {}
        for name in GRAPHS:  # quiet: the exporter's and the optimizer's own progress lines; --verbose shows them
            raw = graphs_dir / f"{name}.onnx"
            with phase(f"exporting the {name} graph to ONNX"), quiet():
                dtypes[name] = exported.export_model(graphs[name], name, raw, in_float32)
            with phase(f"checking the {name} ONNX model (onnx.checker)"), quiet():
                exported.check(raw)  # the standard ONNX model; the optimized one has ORT's own ops, checked at load
            with phase(f"optimizing the {name} ONNX model (ONNX Runtime's transformer optimizer)"), quiet():
                exported.optimize(raw, engine_dir / f"{name}.onnx", exported.heads(graphs[name].module))
        record = {"models": {n: f"{n}.onnx" for n in GRAPHS}, "providers": providers(),
                  "optimizer": "onnxruntime.transformers mmdit, then ORT_ENABLE_ALL at load",
                  "checked": "exported model: onnx.checker and strict shape inference, both from the file path",
                  "weights": "graph inputs named by parameter FQN, without data: bound at load (bindings.json) "
                             "by I/O binding, replaceable by name",
                  "intra_op_threads": "cores available to the process at load"}
        if in_float32:  # bf16 weights computed in float32: the session's own input types, not the build's
            record.update(compute="float32", input_dtypes=dtypes)
        return record

    def load(self, engine_dir: Path, spec: LoadSpec):
        in_float32 = spec.options.get("compute") == "float32"
        if spec.dtype == "bfloat16" and not in_float32 and "CUDAExecutionProvider" not in providers():
            raise SvdExportError("this ONNX engine computes in bfloat16, which ONNX Runtime runs only on its CUDA and "
                                 "TensorRT providers (the CPU provider has no bfloat16 kernels): run it where "
                                 "onnxruntime-gpu sees a GPU, or build it on a CPU (bf16 weights, float32 compute)")
        if in_float32:  # the inputs as the session takes them, whatever the build's dtype
            spec = dataclasses.replace(spec, graphs=_session_dtypes(spec))

        def one(name: str) -> OrtGraph:
            path = spec.file("models", name, engine_dir)
            # The weights files a model names: each one the manifest lists (confined to the engine folder, and
            # verified) under its name relative to the model's own folder (engines built before bindings).
            folder = Path(spec.options["models"][name]).parent
            resolve = None if spec.resolve is None else (lambda location: spec.resolve((folder / location).as_posix()))
            bound = spec.constants(name) if spec.constants is not None else None
            return OrtGraph(path, spec.graphs[name].inputs, resolve, spec.check_unchanged, bound)

        return compiled_pair(spec, one)

    fixed_weights = None

    def update_weights(self, graphs: tuple, weights: dict[str, dict[str, torch.Tensor]], spec: LoadSpec) -> None:
        """The sessions' weights replaced by name (the parameter FQNs the exporter kept): bound inputs rebound,
        initializers (engines built before bindings) given to a new session."""
        for name, graph in zip(GRAPHS, graphs):  # both checked before either changes
            missing_weights(name, weights.get(name) or {}, graph.fn.names)
        for name, graph in zip(GRAPHS, graphs):
            if weights.get(name):
                graph.fn.replace(dict(weights[name]))


def _session_dtypes(spec: LoadSpec) -> dict:
    """The engine's graph specs with the input dtypes its sessions take (backend_options' input_dtypes)."""
    recorded = spec.options.get("input_dtypes")
    graphs = {}
    for name, g in spec.graphs.items():
        dtypes = recorded.get(name) if isinstance(recorded, dict) else None
        if not isinstance(dtypes, list) or len(dtypes) != len(g.inputs) or \
                not all(isinstance(getattr(torch, str(d), None), torch.dtype) for d in dtypes):
            raise SvdExportError(f"the engine's manifest records no valid input dtypes for its {name} graph: rebuild it")
        graphs[name] = dataclasses.replace(g, input_dtypes=list(dtypes))
    return graphs


def _drop_gpu_notice(record) -> bool:
    """The mmdit optimizer asks for onnxruntime-gpu>=1.21 whatever the device; on a CPU-only install the CPU
    provider runs the optimized model (the backend tests do), so the notice only misleads there."""
    return "onnxruntime-gpu" not in record.getMessage()


BACKEND = OnnxBackend()
