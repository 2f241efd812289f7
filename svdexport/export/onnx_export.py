"""The ONNX models of an onnx build: exported from the torch.export programs with every weight declared but not
stored, checked, and optimized by ONNX Runtime's transformer optimizer (export/onnx.py loads them).

- Weights: every constant of a program (parameter, buffer, lifted tensor) stays an initializer named by its
  FQN (a LoRA replaces it by name), declared as external data at `BOUND`, a location that is no file: the
  model holds its type and shape, and the engine binds its bytes at load (the referenced checkpoint or the
  engine's constants file, export/bindings.py) through add_external_initializers. Neither the graphs folder
  nor the engine folder holds a copy of the weights, and no step of the build serializes one.
- bf16 on a CPU (`float32_compute`): ONNX Runtime's CPU provider has no bf16 kernels, so the graph is exported
  again from its module with every bf16 weight read through a cast to float32 (a parametrization, so
  diffusers' own dtype checks see float32 weights): the initializers stay bf16, the checkpoint's bytes, each
  cast where it is used, and the activations are float32: the eager model in float32 from the same weights.
- The transformer optimizer (model type "mmdit", the FLUX/SD3 family) reads the graph's structure and small
  constants only: it runs on the model without weight data (measured on the digits model: the same nodes and
  initializers as from the model with its weights).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path

import torch

from svdexport.errors import SvdExportError
from svdexport.export import GraphExport
from svdexport.export.bindings import graph_constants
from svdexport.quiet import quiet

BOUND = "svdexport-bound-weights"  # external-data location of a declared weight: no file, bound at load
_PARAMETRIZED = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")  # a.parametrizations.w.original -> a.w


def float32_compute(graphs: dict[str, GraphExport]) -> bool:
    """bf16 weights built on a CPU: computed in float32 (ONNX Runtime's CPU provider has no bf16 kernels)."""
    g = next(iter(graphs.values()))
    on_cpu = all(a.device.type == "cpu" for a in g.args if isinstance(a, torch.Tensor))
    return on_cpu and any(p.dtype == torch.bfloat16 for p in g.module.parameters())


def export_model(g: GraphExport, name: str, raw: Path, in_float32: bool) -> list[str]:
    """Exports `g` to `raw`, its weights declared (not stored); returns the dtypes its inputs are taken in."""
    import onnx_ir as ir

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program, args, names = _float32_program(g) if in_float32 else \
                (g.program, g.args, {n: n for n in graph_constants(g.program)})
            onnx_program = torch.onnx.export(program, args, input_names=g.input_names, output_names=g.output_names,
                                             dynamo=True, optimize=False, verbose=False,
                                             custom_translation_table=_translations())
            _optimize_keeping_weights(onnx_program, set(names))
            _declare(onnx_program.model, names)
            for node in ir.traversal.RecursiveGraphIterator(onnx_program.model.graph):
                node.metadata_props.clear()  # the exporter's stack traces (build-machine paths): 85% of the bytes
            ir.save(onnx_program.model, str(raw))
    except SvdExportError:
        raise
    except Exception as e:
        raise SvdExportError(f"ONNX export failed on the {name} graph: {str(e).splitlines()[0]}") from e
    return [str(a.dtype).removeprefix("torch.") for a in args]


def _float32_program(g: GraphExport):
    """`g`'s module exported with float32 activations, each bf16 weight cast to float32 where it is read;
    (program, example args, {the program's constant name: the FQN the engine binds} for the cast weights)."""
    args = tuple(a.float() if a.dtype == torch.bfloat16 else a for a in g.args)
    with quiet(), _read_in_float32(g.module):
        program = torch.export.export(g.module, args, dynamic_shapes=g.dynamic_shapes(), strict=False)
    names = {n: _PARAMETRIZED.sub(r"\1\2", n) for n in graph_constants(program) if _PARAMETRIZED.search(n)}
    return program, args, names


class _Float32(torch.nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.float()


@contextlib.contextmanager
def _read_in_float32(module: torch.nn.Module):
    """Every bf16 parameter and buffer of `module` read as float32 inside, restored (the same tensors) after."""
    from torch.nn.utils import parametrize

    done = []
    try:
        for owner in list(module.modules()):
            tensors = [*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False)]
            for leaf, t in tensors:
                if t.dtype == torch.bfloat16:
                    parametrize.register_parametrization(owner, leaf, _Float32(), unsafe=True)
                    done.append((owner, leaf))
        yield
    finally:
        for owner, leaf in reversed(done):
            parametrize.remove_parametrizations(owner, leaf, leave_parametrized=False)


def _declare(model, names: dict[str, str]) -> None:
    """The initializers `names` lists (ONNX name -> the FQN the engine binds) renamed to that FQN and declared at
    BOUND: type and shape, no bytes."""
    import onnx_ir as ir

    for onnx_name, fqn in names.items():
        value = model.graph.initializers.get(onnx_name)
        if value is None:  # a constant the graph does not read
            continue
        t = value.const_value
        value.name = fqn
        value.const_value = ir.ExternalTensor(BOUND, 0, t.nbytes, t.dtype, shape=t.shape, name=fqn)


def declared(tensor) -> bool:
    """Whether an initializer (onnx.TensorProto) is a declared weight, bound at load."""
    return tensor.data_location == 1 and any(e.key == "location" and e.value == BOUND for e in tensor.external_data)


def check(path: Path) -> None:
    """Validates the exported model and infers its shapes strictly, its declared weights given as typed graph
    inputs (the checker would look for their bytes at BOUND)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
        weights = [t for t in proto.graph.initializer if declared(t)]
        others = [t for t in proto.graph.initializer if not declared(t)]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(others)
        proto.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                 for t in weights)
        onnx.checker.check_model(proto)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except Exception as e:
        raise SvdExportError(f"the exported ONNX model {path.name} is invalid: {str(e).splitlines()[0]}") from e


def optimize(raw: Path, out: Path, heads: tuple[int, int]) -> None:
    """ONNX Runtime's transformer optimizer (mmdit) over the model without weight data, saved to `out`."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    proto = onnx.load(str(raw), load_external_data=False)
    before = {t.name for t in proto.graph.initializer if declared(t)}
    # num_heads/hidden_size 0 lets the optimizer read them from the graph where it can.
    optimized = optimize_model(proto, model_type="mmdit", num_heads=heads[0], hidden_size=heads[1], opt_level=0,
                               use_gpu=False)
    stored = [t.name for t in optimized.model.graph.initializer if t.name in before and not declared(t)]
    if stored:  # a fusion that computed a new weight from one: a design bug, not the user's input
        raise SvdExportError(f"the ONNX optimizer stored weight {stored[0]} in the model; report it")
    optimized.save_model_to_file(str(out))


def _optimize_keeping_weights(onnx_program, weights: set[str]) -> None:
    """The exporter's own optimizer (onnxscript), except that no node reading a weight is constant-folded: every
    weight stays an initializer named by its FQN (ORT fuses the transposes at load), so a LoRA's fused weights
    can replace it by name. torch.onnx's optimize=True folds small weights' transposes into anonymous constants."""
    from onnxscript.optimizer import optimize_ir

    def should_fold(node) -> bool | None:
        return False if any(v is not None and v.name in weights for v in node.inputs) else None

    optimize_ir(onnx_program.model, should_fold=should_fold)


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


def heads(module: torch.nn.Module) -> tuple[int, int]:
    for m in module.modules():
        if hasattr(m, "heads") and hasattr(m, "head_dim"):
            return m.heads, m.heads * m.head_dim
    return 0, 0
