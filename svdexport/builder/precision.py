"""`--dtype auto`: the precision a build picks, and the one-line reason `svdexport build` prints.

The rule, first match wins:
1. the model declares its precision (its svdexport.json or bundled spec: {"precision": {"dtype", "why"}}),
   because bf16 was measured to cost it too much (the bundled digits model);
2. a CUDA build runs bf16 (FLUX.1's released precision; diffusers and the TensorRT demos run it so);
3. the onnx backend on a CPU runs fp32: ONNX Runtime's CPU provider has no bf16 kernels (`--dtype bf16` there
   keeps bf16 weights, the checkpoint's bytes, and computes in float32: export/onnx.py);
4. a CPU with native bf16 matrix units (AMX-BF16 or AVX512-BF16, hardware.cpu_bf16) runs bf16, any other fp32.

What stays float32 inside a bf16 engine: the cache math (models/mmdit.py: bases, coefficients, residuals,
forecast) and the rotary table (a float32 input, as diffusers' FluxPosEmbed returns it); the timestep's
sinusoidal embedding and the norms' statistics are computed in float32 by diffusers' own modules, which the
graphs call unmodified.
"""

from __future__ import annotations

from typing import Callable

from svdexport import hardware
from svdexport.errors import SvdExportError

PRECISIONS = ("fp32", "bf16", "fp16")


def declared(precision: dict | None) -> tuple[str, str] | None:
    """A model's declared (dtype, why), validated; None where it declares nothing."""
    if not precision:
        return None
    dtype = precision.get("dtype")
    if dtype not in PRECISIONS:
        raise SvdExportError(f"the model declares precision {dtype!r} (choose from {', '.join(PRECISIONS)})")
    return dtype, str(precision.get("why", "declared by the model"))


def auto_dtype(device: str, backend: str, precision: dict | None = None,
               cpu_bf16: Callable[[], tuple[bool, str]] | None = None) -> tuple[str, str]:
    """(dtype, reason) for `--dtype auto`; `cpu_bf16` defaults to hardware.cpu_bf16 (this machine)."""
    if (own := declared(precision)) is not None:
        return own[0], f"the model declares {own[0]}: {own[1]}"
    if device == "cuda":
        return "bf16", "bf16 on CUDA, FLUX.1's released precision"
    if backend == "onnx":
        return "fp32", ("ONNX Runtime's CPU provider has no bf16 kernels; --dtype bf16 keeps bf16 weights and "
                        "computes in float32")
    native, why = (cpu_bf16 or hardware.cpu_bf16)()
    if native:
        return "bf16", f"{why} (bf16 matmuls run natively)"
    return "fp32", why


def resolve(dtype: str, device: str, backend: str, precision: dict | None = None) -> tuple[str, str]:
    """The build's dtype and the reason for it, for a dtype the user gave or `auto`."""
    if dtype == "auto":
        chosen, reason = auto_dtype(device, backend, precision)
        return chosen, f"auto: {reason}"
    return dtype, f"--dtype {dtype}"
