"""`build --quantize`: quantized engines in a build (issue 27, item 1; docs/int8.md has the measurements).

Calibration (bases, plans) runs on the unquantized model as always; only the exported graphs are quantized,
after the graphs' example inputs are made and before torch.export:
- CPU, aoti (`int8`): each graph goes through PT2E with X86InductorQuantizer (every linear, the conditioning
  GEMVs too: dynamic per-tensor activation scales, per-channel int8 weights) from the fp32 model, and the aoti
  backend compiles it with freezing (export/aoti_frozen.py): oneDNN's qlinear on prepacked int8 weights
  (AMX-INT8 on Sapphire Rapids, AVX512-VNNI on Zen 4). 1.56-1.74x the bf16 aoti engine's full step at FLUX.1
  width on Sapphire Rapids; the int8 weights and scales go into the engine's constants file (1 B/param).
- CUDA, aoti (`fp8` on compute capability 8.9+, `int8` elsewhere): torchao's dynamic per-row quantization of
  the transformer's token linears (the conditioning GEMVs keep the engine's dtype), unwrapped to plain tensors.

Only the aoti backend ships quantized engines; other backends, and fp8 on a CPU, are refused in one line.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from torch import nn

from svdexport.errors import SvdExportError, first_line
from svdexport.export import GraphExport, backend
from svdexport.export import quantize as qz
from svdexport.progress import phase
from svdexport.quiet import quiet

if TYPE_CHECKING:  # build imports this module
    from svdexport.builder.build import BuildOptions, Prepared

SHIPPED_BACKENDS = ("aoti",)
# Peak build memory over the build dtype's weight bytes. int8 on a CPU, measured at FLUX.1 width (docs/int8.md):
# ~8 B/param (the fp32 model for PT2E's observers and export, the exported and converted copies, the int8
# weights, freezing's prepacked copy during the compile) = 2 copies of the fp32 weights. torchao on CUDA: the
# bf16 model, its quantized copy and the exported one (estimated).
WEIGHT_COPIES = {qz.PT2E_X86: 2.0, qz.TORCHAO_INT8: 1.6, qz.TORCHAO_FP8: 1.6}
INT8_DTYPE_REASON = "--quantize int8: PT2E quantizes the fp32 model (int8 linears, fp32 between them)"


def check(opts: "BuildOptions") -> None:
    """Refuses, in one line, a --quantize that this build cannot make (before any work); resolves `auto` (the
    best the device has on the aoti backend, else none) and an int8 CPU build's dtype (fp32)."""
    if opts.quantize not in qz.QUANTIZE:
        raise SvdExportError(f"unknown --quantize {opts.quantize!r} (choose from {', '.join(qz.QUANTIZE)})")
    if opts.quantize == "auto":
        shipped = opts.backend in SHIPPED_BACKENDS and importlib.util.find_spec("torchao") is not None
        opts.quantize = qz.choose_scheme("auto", opts.device, opts.backend).name if shipped else "none"
    if opts.quantize == "none":
        return
    if opts.backend not in SHIPPED_BACKENDS:
        raise SvdExportError(f"--quantize {opts.quantize} is built on the aoti backend (PT2E int8 on a CPU, torchao "
                             f"on CUDA), not {opts.backend}: use --backend aoti")
    scheme = qz.choose_scheme(opts.quantize, opts.device, opts.backend)  # fp8 on a CPU or an old GPU: refused
    pt2e = scheme.method == qz.PT2E_X86
    if pt2e and opts.dtype not in ("auto", "fp32"):
        raise SvdExportError(f"--quantize int8 on a CPU quantizes the fp32 model (PT2E's x86 flow; fp32 between "
                             f"the int8 linears), not --dtype {opts.dtype}: leave --dtype out or give fp32")
    if importlib.util.find_spec("torchao") is None:
        raise SvdExportError(f"--quantize {opts.quantize} needs torchao, which is not installed "
                             "(pip install 'svdexport[quantize]')")
    if pt2e:
        opts.dtype, opts.dtype_reason = "fp32", INT8_DTYPE_REASON


def weight_copies(opts: "BuildOptions") -> float:
    """The build's peak memory in copies of its weights (`memory.estimate`): the backend's, or the quantized path's."""
    if opts.quantize == "none":
        return backend(opts.backend).weight_copies
    return WEIGHT_COPIES[qz.choose_scheme(opts.quantize, opts.device, opts.backend).method]


def key_parts(opts: "BuildOptions") -> dict:
    """What --quantize adds to the build key (nothing unquantized: those engines keep the key they had)."""
    return {} if opts.quantize == "none" else {"quantize": opts.quantize}


def _prefix(graph: nn.Module, model: nn.Module) -> str:
    """The transformer's module name inside a graph ("" when the graph is the transformer)."""
    return next((n for n, m in graph.named_modules() if m is model), "")


def apply(p: "Prepared", graphs: dict[str, GraphExport], opts: "BuildOptions") -> None:
    """Quantizes both graphs for export, in place (`GraphExport.module` and `.quantization`); nothing when the
    build is not quantized. The example inputs and the bases stay those of the unquantized model."""
    if opts.quantize == "none":
        return
    scheme = qz.choose_scheme(opts.quantize, opts.device, opts.backend)
    full = graphs["full"].module
    if scheme.method == qz.PT2E_X86:
        scheme.linears = sum(isinstance(m, nn.Linear) for m in full.modules())
        for name, g in graphs.items():
            with phase(f"quantizing the {name} graph ({scheme.name}, PT2E X86InductorQuantizer)"), quiet():
                try:
                    g.module = qz.quantize_pt2e(g.module, g.args, [], dynamic_shapes=g.dynamic_shapes())
                except Exception as e:
                    raise SvdExportError(f"PT2E quantization failed on the {name} graph: "
                                         f"{first_line(e)}") from e
    else:
        quantize_transformer(p.model, full, graphs["full"].args, p.shapes.batch, scheme)
    for g in graphs.values():
        g.quantization = scheme


def quantize_transformer(model: nn.Module, full: nn.Module, args: tuple, batch: int, scheme: qz.QuantScheme) -> None:
    """torchao's scheme on the transformer in place (both graphs share it): every linear but the conditioning
    GEMVs, which `scheme.kept` records by their names in the transformer."""
    prefix = _prefix(full, model)
    kept = qz.conditioning_linears(full, args, batch) if scheme.keep_conditioning else []
    scheme.kept = [k.removeprefix(f"{prefix}.") if prefix else k for k in kept]
    scheme.linears = sum(isinstance(m, nn.Linear) for m in model.modules()) - len(scheme.kept)
    with phase(f"quantizing the transformer ({scheme.name}, torchao)"), quiet():
        qz.quantize_torchao(model, scheme)
