"""Is dynamic int8 worth a `--quantize int8`? FLUX.1's MLP (3072 -> 12288 -> 3072) at 320 and 1088 tokens:
bf16 against dynamic int8 (activations quantized per call), side by side in one process, best of 3.

    pip install torchao   # optional: without it only torch.ao's (deprecated) fbgemm path is measured
    python scripts/measure_int8.py

Measured 2026-11-26 on the 2-core AMD EPYC (Zen 4: AVX512-BF16, AVX512-VNNI) under load; see docs/precision.md.
"""

from __future__ import annotations

import time

import torch
from torch import nn

D = 3072


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(approximate="tanh"), nn.Linear(4 * D, D)).eval()


def variants(m32: nn.Module) -> dict:
    m16 = mlp()
    m16.load_state_dict(m32.state_dict())
    out = {"bf16": (m16.to(torch.bfloat16), torch.bfloat16),
           "int8 dynamic, torch.ao (fbgemm)": (torch.ao.quantization.quantize_dynamic(
               m32, {nn.Linear}, dtype=torch.qint8, inplace=False), torch.float32)}
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        print("torchao is not installed: its rows are left out")
        return out
    ta = mlp()
    ta.load_state_dict(m32.state_dict())
    ta = ta.to(torch.bfloat16)
    quantize_(ta, Int8DynamicActivationInt8WeightConfig())
    out["int8 dynamic, torchao"] = (ta, torch.bfloat16)
    out["int8 dynamic, torchao + torch.compile"] = (torch.compile(ta), torch.bfloat16)
    out["bf16 + torch.compile"] = (torch.compile(m16), torch.bfloat16)
    return out


@torch.inference_mode()
def main() -> None:
    torch.manual_seed(0)
    m32 = mlp()
    vs = variants(m32)
    print(f"threads {torch.get_num_threads()}")
    print("| tokens | variant | ms (best of 3) | bf16 time / this | rel. L2 vs fp32 |")
    print("|---|---|---|---|---|")
    for tokens in (320, 1088):
        x = torch.randn(1, tokens, D)
        ref = m32(x)
        for m, dtype in vs.values():  # warm-up (and compilation)
            m(x.to(dtype)), m(x.to(dtype))
        best = {k: float("inf") for k in vs}
        for _ in range(3):  # interleaved
            for k, (m, dtype) in vs.items():
                xx = x.to(dtype)
                start = time.perf_counter()
                m(xx)
                best[k] = min(best[k], time.perf_counter() - start)
        for k, (m, dtype) in vs.items():
            err = float((m(x.to(dtype)).float() - ref).norm() / ref.norm())
            print(f"| {tokens} | {k} | {best[k] * 1e3:.1f} | {best['bf16'] / best[k]:.2f}x | {err:.4f} |")


if __name__ == "__main__":
    main()
