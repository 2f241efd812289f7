"""The compute limit of a step: its FLOPs counted from the graph, this machine's matmul peak in the engine's
dtype measured in the same run, and the fraction of that peak a step achieves.

FLOPs are those of torch.utils.flop_counter (matrix products and attention: 2 per multiply-add; the
elementwise work, norms and softmax, is not counted), over one call of the eager graph, which is the program
every backend compiles.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from svdexport import hardware


def _sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom() -> dict:
    """Attention kernels the counter's registry lacks: CPU's fused attention (torch 2.13 counts only the CUDA
    ones), counted as the two products it does, as the registry counts the CUDA kernels."""
    ops = [getattr(torch.ops.aten, n, None) for n in ("_scaled_dot_product_flash_attention_for_cpu",)]
    return {op: _sdpa for op in ops if op is not None}


def count_flops(graph, args) -> int:
    """FLOPs of one call `graph(*args)`, counted while it runs."""
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=_custom()) as counter:
        graph(*args)
    return int(counter.get_total_flops())


def engine_peak(engine, repeats: int = 1) -> hardware.Peak:
    """The matmul peak in the engine's dtype on its device, at the shapes of its model (tokens x width)."""
    tokens = engine.shapes.img_tokens + engine.shapes.text_len
    hidden = engine.family.hidden_size(engine.config)
    shapes = hardware.flux_shapes(tokens, hidden, engine.device.type)
    return hardware.matmul_peak(engine.dtype, engine.device.type, shapes, repeats)


def limit(flops: dict[str, int], seconds: dict[str, float], peak: hardware.Peak) -> dict:
    """Achieved FLOP/s and fraction of the peak of each step kind ("full", "cached")."""
    out = {"peak": peak.to_dict()}
    for kind, n in flops.items():
        rate = n / seconds[kind]
        out[kind] = {"flops": n, "seconds": seconds[kind], "flops_per_s": rate,
                     "fraction_of_peak": rate / peak.flops_per_s}
    return out


def describe(lim: dict) -> str:
    """One line of the bench report."""
    p, f = lim["peak"], lim["full"]
    shape = "x".join(str(d) for d in p["shape"])
    shapes = ", ".join(f"{k} {v / 1e12:.3f}" for k, v in p.get("by_shape", {}).items())
    return (f"limit: full step {f['flops'] / 1e9:.1f} GFLOP (counted from the graph) in {f['seconds'] * 1e3:.1f} ms = "
            f"{f['flops_per_s'] / 1e12:.3f} TFLOP/s, {f['fraction_of_peak'] * 100:.0f}% of this machine's "
            f"{p['dtype']} matmul peak {p['flops_per_s'] / 1e12:.3f} TFLOP/s ({p['device']}, {shape}, measured in "
            f"this run; TFLOP/s by shape: {shapes}); cached step {lim['cached']['flops'] / 1e6:.1f} MFLOP")
