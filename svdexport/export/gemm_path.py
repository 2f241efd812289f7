"""Which GEMM path a compiled engine takes, read from the code its compiler generated (issue 27, item 3):
what `svdexport bench` prints beside the fraction of the matmul peak.

The paths, as they appear in AOTInductor's wrapper and kernel sources (the .cpp files inside a .pt2 package)
and in torch.compile's output code (`torch._inductor.utils.run_and_get_code`, the inductor backend):
- "oneDNN int8 (qlinear, prepacked)": PT2E int8 after freezing (`_qlinear_pointwise`): AMX-INT8 on Sapphire
  Rapids, AVX512-VNNI on Zen 4 (oneDNN's brgemm picks the ISA at run time; ONEDNN_VERBOSE=1 names it).
- "oneDNN (linear, prepacked)": bf16/fp32 linears after freezing (`mkldnn._linear_pointwise`).
- "Inductor CPP template (AMX)" / "(AVX512)": Inductor's CPU GEMM template (max_autotune with CPP), its
  micro-kernel named in the kernel source (`_micro_gemm_amx_kernel_*` tiles, or the vectorized one).
- "aten int8 (_int_mm)": torchao's dynamic int8 (oneDNN's s8s8 gemm_api, no AMX on Sapphire Rapids).
- "aten (addmm/mm/bmm: oneDNN brgemm)": the default, unfused matmuls through aten, which call oneDNN
  (AMX-BF16 or AVX512-BF16 for bf16).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

# label, pattern in generated code; every path found is reported, most specific first
PATHS = (
    ("oneDNN int8 (qlinear, prepacked)", re.compile(r"_qlinear_pointwise|onednn\.qlinear_pointwise")),
    ("oneDNN (linear, prepacked)", re.compile(r"_linear_pointwise|mkldnn\._linear_pointwise|_mkl_linear")),
    ("Inductor CPP template (AMX)", re.compile(r"_micro_gemm_amx_kernel|CppMicroGemmAMX")),
    ("Inductor CPP template (AVX512)", re.compile(r"CppMicroGemmFP32Vec|CppMicroGemmAVX512|_micro_gemm_avx512")),
    ("aten int8 (_int_mm)", re.compile(r"_int_mm")),
    ("aten (addmm/mm/bmm: oneDNN brgemm)", re.compile(r"aoti_torch_cpu_(?:addmm|mm|bmm)_out|"
                                                     r"extern_kernels\.(?:addmm|mm|bmm)|aten\.(?:addmm|mm|bmm)\.")),
)


def gemm_paths(code: str) -> list[str]:
    """The GEMM paths that generated code calls, in PATHS order (empty: none recognised)."""
    return [label for label, pattern in PATHS if pattern.search(code)]


def package_code(package: Path) -> str:
    """The generated C++ sources of an AOTInductor package (.pt2 zip)."""
    with zipfile.ZipFile(package) as z:
        return "\n".join(z.read(n).decode(errors="ignore") for n in z.namelist() if n.endswith(".cpp"))


def describe(paths: list[str]) -> str:
    """One line for a report: the main GEMM path, and the others the engine also calls."""
    if not paths:
        return "GEMM path: not recognised in the generated code"
    rest = f" (also {', '.join(paths[1:])})" if len(paths) > 1 else ""
    return f"GEMM path: {paths[0]}{rest}"
