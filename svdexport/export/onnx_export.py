"""The ONNX models of an onnx build: exported from the torch.export programs with their weights as graph inputs,
checked, and optimized by ONNX Runtime's transformer optimizer (export/onnx.py loads them).

- Weights: every constant of a program (parameter, buffer, lifted tensor) is a graph input named by its FQN,
  typed and shaped, without its bytes: neither the graphs folder nor the engine folder holds a copy of the
  weights, and no step of the build serializes one. At load each one is bound by I/O binding to the engine's
  tensor of that name (LoadSpec.constants: views of the mapped checkpoint or constants file), which ONNX
  Runtime reads in place; a LoRA replaces it by name. Initializers were no option: ONNX Runtime 1.32 copies
  every initializer given at session creation (add_external_initializers, measured on FLUX.1 width: a full
  copy of the weights, 15 s), and ConstantFolding and prepacking copy them again.
- bf16 on a CPU (`float32_compute`): ONNX Runtime's CPU provider has no bf16 kernels, so the graph is exported
  again from its module with every bf16 weight read through a cast to float32 (a parametrization, so
  diffusers' own dtype checks see float32 weights): the weights stay bf16, the checkpoint's bytes, each cast
  where it is used, and the activations are float32: the eager model in float32 from the same weights.
- The transformer optimizer (model type "mmdit", the FLUX/SD3 family) reads the graph's structure and small
  constants only, never a weight's value: it runs on the model as it is, with the same fusions as on a model
  holding its weights. On a CPU at FLUX.1 width its model steps as fast as the raw export (ORT's own fusions
  at load do the same); it stays for the GPU providers.

Measured on bundled:flux1-reduced (FLUX.1 width, 1.03B parameters) at 256x256, text 64, 2 shared cores, one
full step, interleaved runs: weights as inputs 2.1 s (fp32), 2.6 s (bf16 weights: the per-step casts); initializers
with prepacking 1.86 s (fp32, a packed copy of every weight and 15 s of session creation) and 1.9 s (bf16
folded to fp32 and prepacked: 2.2x the weight bytes resident). Peak RSS after a full step: 4.47 GiB for 3.83 GiB
of fp32 weights (the mapping, 0.5 GiB of activations), 3.64 GiB for 1.91 GiB of bf16 ones (1.6 GiB of
activations and cast temporaries in ORT's arena).
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

_PARAMETRIZED = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")  # a.parametrizations.w.original -> a.w


def float32_compute(graphs: dict[str, GraphExport]) -> bool:
    """bf16 weights built on a CPU: computed in float32 (ONNX Runtime's CPU provider has no bf16 kernels)."""
    g = next(iter(graphs.values()))
    on_cpu = all(a.device.type == "cpu" for a in g.args if isinstance(a, torch.Tensor))
    return on_cpu and any(p.dtype == torch.bfloat16 for p in g.module.parameters())


def export_model(g: GraphExport, name: str, raw: Path, in_float32: bool) -> list[str]:
    """Exports `g` to `raw`, its weights graph inputs; returns the dtypes its positional inputs are taken in."""
    import onnx_ir as ir
    from onnxscript.optimizer import optimize_ir

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program, args, names = _float32_program(g) if in_float32 else \
                (g.program, g.args, {n: n for n in graph_constants(g.program)})
            onnx_program = torch.onnx.export(program, args, input_names=g.input_names, output_names=g.output_names,
                                             dynamo=True, optimize=False, verbose=False,
                                             custom_translation_table=_translations())
            _weights_as_inputs(onnx_program.model, names)
            # The exporter's own optimizer (onnxscript's, what torch.onnx's optimize=True runs), once the weights
            # are inputs: it folds constants and merges equal initializers, which must not reach a weight (a LoRA
            # replaces each one by its name; equal weights, as fresh norms' ones, were merged into one).
            optimize_ir(onnx_program.model)
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


def _weights_as_inputs(model, names: dict[str, str]) -> None:
    """The initializers `names` lists (ONNX name -> the FQN the engine binds) made graph inputs named by that FQN:
    type and shape, no bytes."""
    import onnx_ir as ir

    for onnx_name, fqn in names.items():
        value = model.graph.initializers.pop(onnx_name, None)
        if value is None:  # a constant the graph does not read
            continue
        t, value.const_value = value.const_value, None
        value.name, value.dtype, value.shape = fqn, t.dtype, ir.Shape(t.shape)
        model.graph.inputs.append(value)


def check(path: Path) -> None:
    """Validates the exported model and infers its shapes strictly (from the file: the in-memory forms stop at
    protobuf's 2 GB)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
        onnx.shape_inference.infer_shapes_path(str(path), str(path), check_type=True, strict_mode=True)
    except Exception as e:
        raise SvdExportError(f"the exported ONNX model {path.name} is invalid: {str(e).splitlines()[0]}") from e


def optimize(raw: Path, out: Path, heads: tuple[int, int]) -> None:
    """ONNX Runtime's transformer optimizer (mmdit) over the exported model, saved to `out` (no weight in it)."""
    from onnxruntime.transformers.optimizer import optimize_model

    # num_heads/hidden_size 0 lets the optimizer read them from the graph where it can.
    optimized = optimize_model(str(raw), model_type="mmdit", num_heads=heads[0], hidden_size=heads[1], opt_level=0,
                               use_gpu=False)
    optimized.save_model_to_file(str(out))


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
