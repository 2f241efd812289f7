"""`svdexport bench ENGINE`: step and end-to-end latency of an engine against eager PyTorch, as ratios
measured side by side in one process (interleaved repeats, medians)."""

from __future__ import annotations

import resource
import statistics
import time
from typing import Callable

import torch

# Targets of issue 3, as ratios: engine full step vs eager full step, cached vs full step of the
# engine, and end-to-end speedup of the engine with cache over eager without cache.
TARGETS = {"full_step_vs_eager": 0.6, "cached_vs_full_step": 0.05, "e2e_speedup_vs_eager_uncached": 8.0}


def _median_time(fn: Callable[[], object], times: list[float], calls: int) -> None:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    times.append((time.perf_counter() - start) / calls)


@torch.inference_mode()
def bench(engine_dir: str, steps: int = 50, repeats: int = 5, step_calls: int = 10, e2e_repeats: int = 3) -> dict:
    import svdexport

    engine = svdexport.load(engine_dir)
    m = engine.manifest
    eager = engine.eager_reference()

    inputs = engine.example_inputs(0)
    state = {**inputs, "bases": engine.sampler.bases}
    # Mid-schedule (scheduler timestep 500), in the family's model convention.
    state["timestep"] = engine.sampling.model_timestep(torch.tensor(500.0, device=engine.device),
                                                        inputs["hidden_states"])
    _, state["coeffs"], state["residuals"] = eager.full(*[state[n] for n in eager.full.input_names])

    def step(graph):
        args = [state[n] for n in graph.input_names]
        return lambda: graph(*args)

    steps_fns = {"eager_full": step(eager.full), "engine_full": step(engine.full),
                 "eager_cached": step(eager.cached), "engine_cached": step(engine.cached)}
    e2e_fns = {
        "eager_uncached": lambda: eager.generate(inputs, steps=steps, interval=1),
        "eager_cached": lambda: eager.generate(inputs, steps=steps),
        "engine_uncached": lambda: engine.generate(inputs, steps=steps, interval=1),
        "engine_cached": lambda: engine.generate(inputs, steps=steps),
    }
    for fn in steps_fns.values():  # warm-up: one-time costs stay out of the medians
        fn(), fn()
    step_times = {k: [] for k in steps_fns}
    for _ in range(repeats):
        for k, fn in steps_fns.items():
            _median_time(fn, step_times[k], step_calls)
    e2e_times = {k: [] for k in e2e_fns}
    for _ in range(e2e_repeats):
        for k, fn in e2e_fns.items():
            e2e_times[k].append(fn().seconds)
    s = {k: statistics.median(v) for k, v in step_times.items()}
    e = {k: statistics.median(v) for k, v in e2e_times.items()}
    ratios = {
        "full_step_vs_eager": s["engine_full"] / s["eager_full"],
        "cached_step_vs_eager_full": s["engine_cached"] / s["eager_full"],
        "cached_vs_full_step": s["engine_cached"] / s["engine_full"],
        "e2e_speedup_vs_eager_uncached": e["eager_uncached"] / e["engine_cached"],
        "e2e_engine_cache_speedup": e["engine_uncached"] / e["engine_cached"],
        "e2e_engine_vs_eager_cached": e["eager_cached"] / e["engine_cached"],
    }
    memory = {"process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if engine.device.type == "cuda":
        memory["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return {
        "engine": str(engine_dir), "backend": m.backend, "device": str(engine.device), "dtype": m.dtype,
        "shapes": m.shapes.build, "cache": m.cache.to_dict(), "steps": steps,
        "step_seconds": s, "e2e_seconds": e, "ratios": ratios, "memory": memory,
        "targets": {k: {"target": t, "measured": ratios[k],
                        "met": ratios[k] <= t if k != "e2e_speedup_vs_eager_uncached" else ratios[k] >= t}
                    for k, t in TARGETS.items()},
        "method": f"medians of {repeats} interleaved repeats ({step_calls} calls per step timing), "
                  f"{e2e_repeats} interleaved end-to-end runs of {steps} steps",
    }


def format_report(r: dict) -> str:
    s, e, q = r["step_seconds"], r["e2e_seconds"], r["ratios"]
    c = r["cache"]
    lines = [
        f"engine {r['engine']} ({r['backend']}, {r['device']}, {r['dtype']}, {r['shapes']}); "
        f"{c['granularity']} / {c['predictor']}, warmup {c['warmup']}, interval {c['interval']}",
        "",
        "| measurement | eager | engine | engine / eager |",
        "|---|---|---|---|",
        f"| full step | {s['eager_full'] * 1e3:.2f} ms | {s['engine_full'] * 1e3:.2f} ms | {q['full_step_vs_eager']:.2f}x |",
        f"| cached step | {s['eager_cached'] * 1e3:.2f} ms | {s['engine_cached'] * 1e3:.2f} ms "
        f"| {s['engine_cached'] / s['eager_cached']:.2f}x |",
        f"| {r['steps']} steps, no cache | {e['eager_uncached']:.3f} s | {e['engine_uncached']:.3f} s "
        f"| {e['engine_uncached'] / e['eager_uncached']:.2f}x |",
        f"| {r['steps']} steps, SVD-Cache | {e['eager_cached']:.3f} s | {e['engine_cached']:.3f} s "
        f"| {e['engine_cached'] / e['eager_cached']:.2f}x |",
        "",
        f"engine with cache vs eager without: {q['e2e_speedup_vs_eager_uncached']:.2f}x faster; "
        f"engine cached step = {q['cached_vs_full_step'] * 100:.1f}% of its full step",
        "memory: " + ", ".join(f"{k} {v:.0f}" for k, v in r["memory"].items()),
        "targets: " + "; ".join(
            f"{k} {'<=' if k != 'e2e_speedup_vs_eager_uncached' else '>='} {t['target']}: {t['measured']:.3f} "
            f"({'met' if t['met'] else 'NOT met'})" for k, t in r["targets"].items()),
        f"method: {r['method']}",
    ]
    return "\n".join(lines)
