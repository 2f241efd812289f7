"""What this machine computes fast: native bf16 matrix units on the CPU, and the matmul peak in a dtype.

Bottom layer (beside errors and files): it knows torch, /proc/cpuinfo and CUDA, nothing of models or engines.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# CPU flags (Linux /proc/cpuinfo) of instructions that multiply bf16 matrices natively, best first, with the
# name a user knows them by. oneDNN, which runs PyTorch's CPU matmuls and AOTInductor's, uses both.
BF16_FLAGS = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"))
# torch's CPU kernel capability (torch.backends.cpu.get_cpu_capability()) at which its own bf16 kernels
# (norms, softmax, elementwise) are vectorized; below it (a machine without AVX512, or ATEN_CPU_CAPABILITY
# lowered by the user) they run scalar conversions and bf16 loses what its matmuls win.
BF16_CAPABILITIES = ("AVX512", "AMX")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU's feature flags, or None where the system does not list them (not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


# SVDEXPORT_CPU_BF16=0 or 1 overrides the detection (the test suite sets 0, so that the engines its tests
# build do not depend on the machine's CPU).
OVERRIDE = "SVDEXPORT_CPU_BF16"


def cpu_bf16(flags: set[str] | None = None, capability: str | None = None) -> tuple[bool, str]:
    """(whether this CPU multiplies bf16 natively, the evidence in words). Flags default to /proc/cpuinfo's;
    where none are listed, torch's own CPU checks decide."""
    if flags is None and os.environ.get(OVERRIDE) in ("0", "1"):
        on = os.environ[OVERRIDE] == "1"
        return on, f"{OVERRIDE}={os.environ[OVERRIDE]} {'asks for' if on else 'turns off'} bf16 on this CPU"
    flags = cpu_flags() if flags is None else flags
    capability = cpu_capability() if capability is None else capability
    if flags is None:  # no /proc/cpuinfo: ask torch (private checks, absent in some builds)
        flags = {flag for flag, check in (("amx_bf16", "_is_amx_tile_supported"),
                                          ("avx512_bf16", "_is_avx512_bf16_supported"))
                 if getattr(torch.cpu, check, lambda: False)()}
    unit = next((name for flag, name in BF16_FLAGS if flag in flags), None)
    if unit is None:
        return False, "this CPU has no native bf16 matrix unit (no AMX-BF16 or AVX512-BF16)"
    if not any(capability.startswith(c) for c in BF16_CAPABILITIES):
        return False, f"this CPU has {unit}, but torch's CPU kernels run at capability {capability}"
    return True, f"this CPU has {unit}"


def describe_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU in words, for every number a benchmark prints: its model name, its bf16 and int8 matrix units
    (this project's machines are an Intel Sapphire Rapids with AMX, or an AMD Zen 4 with AVX512-BF16/VNNI and
    no AMX) and the cores this process may use."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    field_of = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines()) if v}
    flags = cpu_flags(cpuinfo) or set()
    units = [name for flag, name in (("amx_bf16", "AMX-BF16"), ("amx_int8", "AMX-INT8"), ("avx512_bf16", "AVX512-BF16"),
                                     ("avx512_vnni", "AVX512-VNNI")) if flag in flags]
    kind = ("Intel Sapphire Rapids class" if "amx_bf16" in flags else
            "AMD Zen 4 class" if field_of.get("vendor_id") == "AuthenticAMD" and "avx512_bf16" in flags else "")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [field_of.get("model name", "unknown CPU"), kind, ", ".join(units) + ("" if "amx_bf16" in flags or not
                                                                                   units else ", no AMX"),
             f"{cores} cores"]
    return "; ".join(p for p in parts if p)


@dataclass
class Peak:
    """The best matmul rate measured in one dtype on one device."""

    flops_per_s: float
    shape: tuple[int, int, int]  # (M, K, N) of the best product
    dtype: str
    device: str
    by_shape: dict[str, float] = field(default_factory=dict)  # "MxKxN" -> FLOP/s, every shape measured

    def to_dict(self) -> dict:
        return {"flops_per_s": self.flops_per_s, "shape": list(self.shape), "dtype": self.dtype,
                "device": self.device, "by_shape": dict(self.by_shape)}

    def merge(self, other: "Peak") -> "Peak":
        """The best of two measurements, shape by shape."""
        by = {k: max(v, other.by_shape.get(k, 0.0)) for k, v in self.by_shape.items()}
        by |= {k: v for k, v in other.by_shape.items() if k not in by}
        best = self if self.flops_per_s >= other.flops_per_s else other
        return Peak(best.flops_per_s, best.shape, best.dtype, best.device, by)


def flux_shapes(tokens: int, hidden: int, device: str) -> list[tuple[int, int, int]]:
    """Matmuls a FLUX step runs: tokens x hidden against the attention (D x D) and MLP (D x 4D, 4D x D)
    weights at the model's width, and one square-ish product at FLUX.1's width (3072) with as many rows as
    the device fills (1024 on a CPU, 4096 on a GPU), so a narrow model is still set against the machine."""
    rows = 4096 if device == "cuda" else 1024
    shapes = [(tokens, hidden, hidden), (tokens, hidden, 4 * hidden), (tokens, 4 * hidden, hidden),
              (rows, 3072, 3072)]
    return list(dict.fromkeys(shapes))


def _time_cpu(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _time_cuda(fn, repeats: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(repeats):
        start.record()
        for _ in range(10):  # ten products per timing: one launch is too short for the events' resolution
            fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / 10)
    return best


@torch.inference_mode()
def matmul_peak(dtype: torch.dtype, device: str, shapes: list[tuple[int, int, int]], repeats: int = 3) -> Peak:
    """This machine's matmul rate in `dtype`: for each (M, K, N) the best of `repeats` timed products on
    random data (after one untimed product), and the best over the shapes."""
    g = torch.Generator(device=device).manual_seed(0)
    best = Peak(0.0, shapes[0], str(dtype).removeprefix("torch."), device)
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=g, device=device).to(dtype)
        b = torch.randn(k, n, generator=g, device=device).to(dtype)
        torch.mm(a, b)  # warm-up: library handles, kernel choice, page faults
        if device == "cuda":
            torch.cuda.synchronize()
            seconds = _time_cuda(lambda: torch.mm(a, b), repeats)
        else:
            seconds = _time_cpu(lambda: torch.mm(a, b), repeats)
        rate = 2 * m * k * n / seconds
        best.by_shape[f"{m}x{k}x{n}"] = rate
        if rate > best.flops_per_s:
            best = Peak(rate, (m, k, n), best.dtype, device, best.by_shape)
    return best
