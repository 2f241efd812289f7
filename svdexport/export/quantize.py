"""`build --quantize`: which quantization scheme a build uses, and the three ways to apply it (issue 27, item 1).

A scheme is chosen per device, backend and GPU generation (`choose_scheme`), and recorded in the manifest
(`QuantScheme.to_dict`):
- CPU, aoti / inductor: PT2E with torchao's X86InductorQuantizer, dynamic activation scales (one per call,
  computed at run time), per-channel symmetric int8 weights. Compiled under no_grad with Inductor's freezing,
  its linears become oneDNN's qlinear on prepacked int8 weights: AMX-INT8 on Sapphire Rapids, AVX512-VNNI on
  Zen 4 (docs/int8.md has the measurements and why it wins over torchao's int8 on a CPU).
- CPU, onnx: ONNX Runtime's dynamic quantizer (MatMulInteger, per-tensor activation scales: its CPU kernels
  take no per-token scale), signed int8 per-channel weights.
- CUDA: torchao's float8 dynamic activation + weight (per-row scales) on GPUs of compute capability 8.9 or
  newer (Ada, Hopper), torchao's int8 dynamic activation + weight (per-row) on older ones.

The conditioning GEMVs (the linears that read the timestep/guidance/pooled embedding: the time-text embedders
and every AdaLN modulation; `conditioning_linears` finds them by the rows they see, not by name, so it holds
for any family) are quantized on a CPU and kept on CUDA (`keep_conditioning`). On a CPU they are pure weight
streaming (330 M parameters read for one row each at FLUX.1 width), PT2E would leave them in fp32 (1.3 GB a
step: the int8 engine fell from 1.6-1.7x to 1.3x the bf16 engine), and their one activation row makes a
per-tensor dynamic scale a per-token one: quantized, the digits model's SVD-Cache lost 0.03 dB. On a GPU
they cost nothing next to the token matmuls, so they keep the engine's dtype.

A LoRA on a quantized engine is refused in one line (`LORA_REFUSAL`): the int8 weights are derived constants
(quantized, and on a CPU prepacked in oneDNN's blocked layout), so a LoRA would need the bf16 weights it
patches, a re-quantization and a re-pack at every load; fuse the LoRA and build again instead.

torchao is optional (`pip install 'svdexport[quantize]'`): this module imports it only inside the functions
that use it, so its pure parts (the choice, the record, the filter) run without it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from svdexport.errors import SvdExportError

QUANTIZE = ("none", "int8", "fp8", "auto")  # --quantize values; auto: fp8 where the GPU has it, else int8
FP8_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9) and Hopper (9.0) and newer
# Methods, by what applies them.
PT2E_X86 = "pt2e-x86inductor-dynamic"
ORT_DYNAMIC = "onnxruntime-dynamic"
TORCHAO_INT8 = "torchao-int8-dynamic"
TORCHAO_FP8 = "torchao-float8-dynamic"
LORA_REFUSAL = ("this engine is quantized ({scheme}): its int8/fp8 weights are derived at build, so a LoRA "
                "cannot be loaded into it; fuse the LoRA into the checkpoint and build again")
# Names of conditioning linears in diffusers' FLUX and HunyuanVideo transformers, for the record and for a
# model whose conditioning rows cannot be traced; `conditioning_linears` is the rule the build uses.
CONDITIONING_NAMES = re.compile(r"(^|\.)(time_text_embed|time_embed|guidance_embed|timestep_embedder)\.|"
                                r"(^|\.)norm[a-z0-9_]*\.linear$")


@dataclass
class QuantScheme:
    """What a quantized engine computes in low precision, as its manifest records it."""

    name: str  # "int8" or "fp8"
    method: str  # PT2E_X86, ORT_DYNAMIC, TORCHAO_INT8, TORCHAO_FP8
    activations: str  # how activation scales are made: "per-tensor, dynamic" or "per-row, dynamic"
    weights: str = "per-channel, symmetric"
    keep_conditioning: bool = False  # leave the conditioning GEMVs in the engine's dtype
    kept: list[str] = field(default_factory=list)  # linears left in the engine's dtype (module names), at build
    linears: int = 0  # linears quantized in the full graph, at build (0: not counted, older records)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "QuantScheme | None":
        if not data:
            return None
        try:
            return cls(str(data["name"]), str(data["method"]), str(data["activations"]), str(data["weights"]),
                       bool(data.get("keep_conditioning", False)), [str(k) for k in data.get("kept", [])],
                       int(data.get("linears", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise SvdExportError(f"the engine's quantization record is malformed ({type(e).__name__}: {e})") from None


def choose_scheme(requested: str, device: str, backend: str,
                  capability: tuple[int, int] | None = None) -> QuantScheme | None:
    """The scheme of `--quantize requested` for a build on `device` with `backend`; `capability` is the CUDA
    GPU's compute capability (None: asked of torch when device is cuda). None for "none"; refused in one
    line where the combination has no scheme."""
    if requested not in QUANTIZE:
        raise SvdExportError(f"unknown --quantize {requested!r} (choose from {', '.join(QUANTIZE)})")
    if requested == "none":
        return None
    if device == "cuda":
        if backend not in ("aoti", "inductor", "eager"):
            raise SvdExportError(f"--quantize {requested} on CUDA is built through torchao, which the {backend} "
                                 "backend cannot compile: use --backend aoti or inductor")
        cc = capability if capability is not None else torch.cuda.get_device_capability()
        has_fp8 = tuple(cc) >= FP8_CAPABILITY
        if requested == "fp8" and not has_fp8:
            raise SvdExportError(f"--quantize fp8 needs a GPU of compute capability {FP8_CAPABILITY[0]}."
                                 f"{FP8_CAPABILITY[1]} or newer (Ada, Hopper); this one is {cc[0]}.{cc[1]}: "
                                 "use --quantize int8")
        if requested in ("fp8", "auto") and has_fp8:
            return QuantScheme("fp8", TORCHAO_FP8, "per-row, dynamic", "per-row, symmetric (float8 e4m3)", True)
        return QuantScheme("int8", TORCHAO_INT8, "per-row, dynamic", keep_conditioning=True)
    if requested == "fp8":
        raise SvdExportError("--quantize fp8 needs a CUDA GPU with float8 (compute capability 8.9 or newer); "
                             "on a CPU use --quantize int8")
    if backend in ("aoti", "inductor"):
        return QuantScheme("int8", PT2E_X86, "per-tensor, dynamic")
    if backend == "onnx":
        return QuantScheme("int8", ORT_DYNAMIC, "per-tensor, dynamic")
    raise SvdExportError(f"--quantize int8 on a CPU is built for the aoti, inductor or onnx backend, not {backend}")


def conditioning_linears(module: nn.Module, args: tuple, batch: int) -> list[str]:
    """Names of the nn.Linear modules of `module` that see at most `batch` rows in one call `module(*args)`:
    the conditioning GEMVs (embedders of the timestep, guidance and pooled text; AdaLN modulations), found by
    running the graph once with hooks. A scheme that keeps them (`keep_conditioning`) records them in `kept`."""
    rows: dict[str, int] = {}
    hooks = []
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            def record(mod, inputs, output, name=name):
                rows[name] = max(rows.get(name, 0), inputs[0].numel() // inputs[0].shape[-1])
            hooks.append(m.register_forward_hook(record))
    try:
        with torch.no_grad():
            module(*args)
    finally:
        for h in hooks:
            h.remove()
    return sorted(n for n, r in rows.items() if r <= batch)


def linear_filter(kept: list[str]):
    """torchao's filter_fn: quantize every nn.Linear except those named in `kept`."""
    skip = set(kept)
    return lambda m, fqn: isinstance(m, nn.Linear) and fqn not in skip


def torchao_config(scheme: QuantScheme):
    """torchao's config for a CUDA scheme (and the int8 one on a CPU, which the measurements compare)."""
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Int8DynamicActivationInt8WeightConfig,
                                      PerRow)

    if scheme.method == TORCHAO_FP8:
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    if scheme.method == TORCHAO_INT8:
        return Int8DynamicActivationInt8WeightConfig()
    raise SvdExportError(f"{scheme.method} is not applied through torchao's quantize_")


def quantize_torchao(module: nn.Module, scheme: QuantScheme) -> nn.Module:
    """`module`'s linears (but `scheme.kept`) quantized in place by torchao, their tensor subclasses unwrapped
    into plain tensors (int8/fp8 data and scales) so that torch.export and AOTInductor take them."""
    from torchao.quantization import quantize_
    from torchao.utils import unwrap_tensor_subclass

    quantize_(module, torchao_config(scheme), filter_fn=linear_filter(scheme.kept))
    return unwrap_tensor_subclass(module)


def quantize_pt2e(module: nn.Module, args: tuple, kept: list[str], dynamic: bool = True,
                  dynamic_shapes=None) -> torch.fx.GraphModule:
    """PT2E with X86InductorQuantizer: every linear but `kept` (module names in `module`) gets int8 weights
    per channel and int8 activations (dynamic: a scale per call; static: calibrated on `args`). Returns the
    converted graph module, to be exported and compiled with freezing under no_grad (`inductor_configs`)."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = xiq.X86InductorQuantizer().set_global(
        xiq.get_default_x86_inductor_quantization_config(is_dynamic=dynamic))
    for name in kept:
        quantizer.set_module_name_qconfig(name, None)
    gm = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False).module()
    gm = prepare_pt2e(gm, quantizer)
    with torch.no_grad():
        gm(*args)  # observers: weights' ranges (and activations', for static scales)
    return without_unused_tensors(convert_pt2e(gm))


def without_unused_tensors(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`gm` without the parameters and buffers its graph no longer reads: convert_pt2e folds each quantized
    weight into a new int8 constant and leaves the float weight on the module, where an export would lift it
    into the program (bound and, from a bf16 checkpoint, cast to fp32 at every load for nothing)."""
    gm.graph.eliminate_dead_code()
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in (*gm.named_parameters(), *gm.named_buffers())]:
        if name not in read:
            owner, _, leaf = name.rpartition(".")
            module = gm.get_submodule(owner) if owner else gm
            module._parameters.pop(leaf, None)
            module._buffers.pop(leaf, None)
    gm.recompile()
    return gm


def exported_module_names(kept: list[str], prefix: str) -> list[str]:
    """`kept` as PT2E's module-name filter sees them in a graph that wraps the transformer under `prefix`."""
    return [f"{prefix}.{k}" if prefix else k for k in kept]


def inductor_configs(scheme: QuantScheme | None, gemm: str = "aten", weights_bound: bool = True) -> dict:
    """Inductor/AOTInductor settings of an engine: `gemm` "aten" (oneDNN through aten, the default) or "cpp"
    (Inductor's CPU GEMM templates: max_autotune over CPP and ATEN, which prepack the weights at compile
    time); a PT2E int8 scheme needs freezing, which Inductor applies only to a compile without grad (compile
    under torch.no_grad()): its prepacked int8 weights are derived constants, rebuilt at load by
    export/derived.py. `weights_bound`: the package holds no constants (bound at load)."""
    if gemm not in ("aten", "cpp"):
        raise SvdExportError(f"unknown GEMM path {gemm!r} (choose from aten, cpp)")
    out = {"aot_inductor.package_constants_in_so": not weights_bound}
    if scheme is not None and scheme.method == PT2E_X86:
        out["freezing"] = True
    if gemm == "cpp":
        out |= {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
    return out


def refuse_lora(scheme: QuantScheme | None) -> None:
    """Refuses, in one line, a LoRA on a quantized engine."""
    if scheme is not None:
        raise SvdExportError(LORA_REFUSAL.format(scheme=f"{scheme.name}, {scheme.method}"))
