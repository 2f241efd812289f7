"""`svdexport bench ENGINE`: step and end-to-end latency of an engine against eager PyTorch in the same dtype
and, for an engine not in float32, against eager float32 (what a user without svdexport runs), as ratios
measured side by side in one process (interleaved repeats, medians); and the compute limit: the full step's
FLOPs counted from the graph against this machine's matmul peak in the engine's dtype, measured in the same run.
"""

from __future__ import annotations

import functools
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from svdexport.bench import roofline
from svdexport.models.family import BASES, COEFFS, LATENTS, RESIDUALS, TIMESTEP

FLUX1_WIDTH = 3072  # hidden size of FLUX.1; the issue-13 targets are for models this wide


@dataclass(frozen=True)
class Target:
    ratio: str  # key of the report's ratios
    at_least: bool  # True: measured >= value; False: measured <= value
    value: float
    source: str  # where the target comes from
    applies: Callable[[dict], bool]  # on the report's context: a target that makes no sense is left out


# Issue 3's targets are for the bundled models (per-step overhead dominates there); issue 13's for FLUX.1 width,
# where the steps are matmul-bound and SVD-Cache alone bounds the speedup (9 full steps of 50: at most 5.56x):
# there a compiled full step cannot be 0.6x of eager's (eager already runs at the matmul peak, which issue
# 13's fraction-of-peak target measures instead).
TARGETS = [
    Target("full_step_vs_eager", False, 0.6, "issue 3",
           lambda c: c["backend"] != "eager" and c["hidden"] < FLUX1_WIDTH),
    Target("cached_vs_full_step", False, 0.05, "issue 3", lambda c: True),
    Target("e2e_speedup_vs_eager_uncached", True, 8.0, "issue 3", lambda c: c["hidden"] < FLUX1_WIDTH),
    Target("e2e_speedup_vs_eager_uncached", True, 5.5, "issue 13", lambda c: c["hidden"] >= FLUX1_WIDTH),
    Target("e2e_speedup_vs_eager_fp32_uncached", True, 20.0, "issue 13",
           lambda c: c["hidden"] >= FLUX1_WIDTH and c["fp32_twin"]),
    Target("full_step_fraction_of_peak", True, 0.8, "issue 13", lambda c: c["hidden"] >= FLUX1_WIDTH),
]


def time_calls(fn: Callable[[], object], times: list[float], calls: int) -> None:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    times.append((time.perf_counter() - start) / calls)


def step_state(engine, reference, shapes=None) -> dict:
    """Inputs of one mid-schedule step (scheduler timestep 500) at `shapes` (default: the build's) with C and R
    from the reference's full step."""
    inputs = engine.example_inputs(0, shapes=shapes)
    state = {**inputs, BASES.name: engine.sampler.bases}
    state[TIMESTEP.name] = engine.sampling.model_timestep(torch.tensor(500.0, device=engine.device),
                                                          inputs[LATENTS.name])
    _, state[COEFFS.name], state[RESIDUALS.name] = reference.full(*[state[n] for n in reference.full.input_names])
    return state


def graph_call(graph, state: dict, dtypes: list[str] | None = None) -> Callable[[], object]:
    """A call of `graph` on the state; `dtypes`: the engine's recorded input dtypes, which a compiled graph
    requires exactly (the eager reference's C and R may be in another dtype than an older engine's)."""
    args = [state[n] for n in graph.input_names]
    if dtypes is not None:
        args = [a.to(getattr(torch, d)) for a, d in zip(args, dtypes)]
    return lambda: graph(*args)


@torch.inference_mode()
def bench(engine_dir: str, steps: int = 50, repeats: int = 5, step_calls: int = 10, e2e_repeats: int = 3,
          peak_repeats: int = 1) -> dict:
    import svdexport

    engine = svdexport.load(engine_dir)
    m = engine.manifest
    eager = engine.eager_reference()
    same = eager is engine  # an eager engine: "against eager" would be against itself
    twin = engine.eager_reference(torch.float32) if engine.dtype != torch.float32 else None

    state = step_state(engine, eager)
    inputs = engine.example_inputs(0)
    graphs = {"engine_full": engine.full, "engine_cached": engine.cached}
    dtypes = {"engine_full": m.graphs["full"].input_dtypes, "engine_cached": m.graphs["cached"].input_dtypes}
    e2e_fns = {"engine_uncached": lambda: engine.generate(inputs, steps=steps, interval=1),
               "engine_cached": lambda: engine.generate(inputs, steps=steps)}
    if not same:
        graphs |= {"eager_full": eager.full, "eager_cached": eager.cached}
        e2e_fns |= {"eager_uncached": lambda: eager.generate(inputs, steps=steps, interval=1),
                    "eager_cached": lambda: eager.generate(inputs, steps=steps)}
    steps_fns = {k: graph_call(g, state, dtypes.get(k)) for k, g in graphs.items()}
    if twin is not None:
        state32 = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        inputs32 = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
        steps_fns |= {"eager_fp32_full": graph_call(twin.full, state32), "eager_fp32_cached": graph_call(twin.cached, state32)}
        e2e_fns["eager_fp32_uncached"] = lambda: twin.generate(inputs32, steps=steps, interval=1)
    for fn in steps_fns.values():  # warm-up: one-time costs stay out of the medians
        fn(), fn()
    step_times = {k: [] for k in steps_fns}
    peaks = []  # the matmul peak, measured once per repeat between the step timings: the same machine state
    for _ in range(repeats):
        for k, fn in steps_fns.items():
            time_calls(fn, step_times[k], step_calls)
        peaks.append(roofline.engine_peak(engine, peak_repeats))
    e2e_times = {k: [] for k in e2e_fns}
    for _ in range(e2e_repeats):
        for k, fn in e2e_fns.items():
            e2e_times[k].append(fn().seconds)
    s = {k: statistics.median(v) for k, v in step_times.items()}
    e = {k: statistics.median(v) for k, v in e2e_times.items()}
    if same:  # the eager columns are the engine's own measurements
        s |= {"eager_full": s["engine_full"], "eager_cached": s["engine_cached"]}
        e |= {"eager_uncached": e["engine_uncached"], "eager_cached": e["engine_cached"]}

    flops = {"full": roofline.count_flops(eager.full, [state[n] for n in eager.full.input_names]),
             "cached": roofline.count_flops(eager.cached, [state[n] for n in eager.cached.input_names])}
    peak = functools.reduce(lambda a, b: a.merge(b), peaks)
    limit = roofline.limit(flops, {"full": s["engine_full"], "cached": s["engine_cached"]}, peak)
    ratios = {
        "full_step_vs_eager": s["engine_full"] / s["eager_full"],
        "cached_step_vs_eager_full": s["engine_cached"] / s["eager_full"],
        "cached_vs_full_step": s["engine_cached"] / s["engine_full"],
        "e2e_speedup_vs_eager_uncached": e["eager_uncached"] / e["engine_cached"],
        "e2e_engine_cache_speedup": e["engine_uncached"] / e["engine_cached"],
        "e2e_engine_vs_eager_cached": e["eager_cached"] / e["engine_cached"],
        "full_step_fraction_of_peak": limit["full"]["fraction_of_peak"],
    }
    if twin is not None:
        ratios |= {"full_step_vs_eager_fp32": s["engine_full"] / s["eager_fp32_full"],
                   "e2e_speedup_vs_eager_fp32_uncached": e["eager_fp32_uncached"] / e["engine_cached"]}
    memory = {"process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    gemm = engine_gemm_path(engine)
    if engine.device.type == "cuda":
        memory["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    context = {"backend": m.backend, "hidden": engine.family.hidden_size(engine.config), "fp32_twin": twin is not None}
    targets = {t.ratio: {"target": t.value, "at_least": t.at_least, "source": t.source, "measured": ratios[t.ratio],
                         "met": ratios[t.ratio] >= t.value if t.at_least else ratios[t.ratio] <= t.value}
               for t in TARGETS if t.applies(context)}
    return {
        "engine": str(engine_dir), "backend": m.backend, "device": str(engine.device), "dtype": m.dtype,
        "shapes": m.shapes.build, "cache": m.cache.to_dict(), "steps": steps,
        "step_seconds": s, "e2e_seconds": e, "ratios": ratios, "limit": limit, "memory": memory,
        "targets": targets, "eager_is_engine": same, "gemm_path": gemm,
        "method": f"medians of {repeats} interleaved repeats ({step_calls} calls per step timing), "
                  f"{e2e_repeats} interleaved end-to-end runs of {steps} steps; matmul peak: best over the "
                  f"repeats of {peak_repeats} product(s) per shape, measured between the step timings",
    }


def engine_gemm_path(engine) -> str | None:
    """The GEMM path an aoti engine's full graph calls, read from its generated code (export/gemm_path.py);
    None for the other backends (their kernels are chosen by their runtimes)."""
    from svdexport.export import gemm_path

    m = engine.manifest
    if m.backend != "aoti":
        return None
    code = gemm_path.package_code(m.path(engine.folder, m.backend_options["packages"]["full"]))
    scheme = m.backend_options.get("quantization")
    quantized = f"; quantized: {scheme['name']} ({scheme['method']})" if scheme else ""
    return gemm_path.describe(gemm_path.gemm_paths(code)) + quantized


def _row(label: str, eager: float, engine: float, unit: str, twin: bool, fp32: float | None = None) -> str:
    scale, fmt = (1e3, "{:.2f} ms") if unit == "ms" else (1.0, "{:.3f} s")
    cells = [fmt.format(eager * scale), fmt.format(engine * scale), f"{engine / eager:.2f}x"]
    if twin:  # the fp32 columns; "-" where eager fp32 was not run (SVD-Cache in fp32 is not what is compared)
        cells = [fmt.format(fp32 * scale) if fp32 else "-"] + cells + [f"{engine / fp32:.3f}x" if fp32 else "-"]
    return f"| {label} | " + " | ".join(cells) + " |"


def format_report(r: dict) -> str:
    s, e, q = r["step_seconds"], r["e2e_seconds"], r["ratios"]
    c = r["cache"]
    twin = "eager_fp32_full" in s
    dt = r["dtype"].replace("bfloat16", "bf16").replace("float32", "fp32").replace("float16", "fp16")
    head = ["measurement", f"eager {dt}", f"engine ({r['backend']})", "engine / eager"]
    if twin:
        head = ["measurement", "eager fp32"] + head[1:] + ["engine / eager fp32"]
    rows = [
        _row("full step", s["eager_full"], s["engine_full"], "ms", twin, s.get("eager_fp32_full")),
        _row("cached step", s["eager_cached"], s["engine_cached"], "ms", twin, s.get("eager_fp32_cached")),
        _row(f"{r['steps']} steps, no cache", e["eager_uncached"], e["engine_uncached"], "s", twin,
             e.get("eager_fp32_uncached")),
        _row(f"{r['steps']} steps, SVD-Cache", e["eager_cached"], e["engine_cached"], "s", twin),
    ]
    lines = [
        f"engine {r['engine']} ({r['backend']}, {r['device']}, {r['dtype']}, {r['shapes']}); "
        f"{c['granularity']} / {c['predictor']}, warmup {c['warmup']}, interval {c['interval']}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *rows,
        "",
    ]
    if r["eager_is_engine"]:
        lines.append("eager engine: its eager columns are its own measurements")
    speed = f"engine with cache vs eager {dt} without: {q['e2e_speedup_vs_eager_uncached']:.2f}x faster"
    if twin:
        speed += f"; vs eager fp32 without: {q['e2e_speedup_vs_eager_fp32_uncached']:.2f}x faster"
    lines += [
        f"{speed}; engine cached step = {q['cached_vs_full_step'] * 100:.1f}% of its full step",
        roofline.describe(r["limit"]),
        *([r["gemm_path"]] if r.get("gemm_path") else []),
        "memory: " + ", ".join(f"{k} {v:.0f}" for k, v in r["memory"].items()),
    ]
    if r["targets"]:
        lines.append("targets: " + "; ".join(
            f"{k} {'>=' if t['at_least'] else '<='} {t['target']} ({t['source']}): {t['measured']:.3f} "
            f"({'met' if t['met'] else 'NOT met'})" for k, t in r["targets"].items()))
    lines.append(f"method: {r['method']}")
    return "\n".join(lines)
