"""`svdexport bench RANGED --against STATIC --resolutions HxW,...` (issue 15): what a shape range costs.

- A ranged engine at its optimal shape (its build shapes) against a static engine built for that shape:
  full step, cached step and a whole generation, measured side by side in one process (interleaved
  repeats, medians), as ratios. Issue 15's target: the ranged full step within 10% of the static one.
- Latency per resolution of the ranged engine (full step, cached step, a whole generation with SVD-Cache),
  with eager PyTorch's full step at the same resolution beside it.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch

from svdexport.bench.latency import graph_call, step_state, time_calls
from svdexport.errors import SvdExportError
from svdexport.models.ranges import parse_sizes

TARGET = 1.10  # issue 15: ranged full step / static full step at the optimal shape


def parse_resolutions(text: str | None) -> list[tuple[int, int]]:
    """'96x96,128x160' -> [(96, 96), (128, 160)] as (height, width)."""
    return parse_sizes(text, "--resolutions")


def _medians(fns: dict[str, Callable[[], object]], repeats: int, calls: int) -> dict[str, float]:
    for fn in fns.values():  # warm-up: one-time costs (compilation, allocation) stay out of the medians
        fn(), fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved: drifts of the machine hit every column alike
        for k, fn in fns.items():
            time_calls(fn, times[k], calls)
    return {k: statistics.median(v) for k, v in times.items()}


def _e2e(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(fn().seconds)
    return {k: statistics.median(v) for k, v in times.items()}


def _same_build(ranged, static) -> None:
    a, b = ranged.manifest, static.manifest
    if b.shapes.kind.value != "static" or a.shapes.kind.value != "ranged":
        raise SvdExportError("bench --against compares a ranged engine (ENGINE) with a static one (--against)")
    for what, x, y in (("weights", a.model.weights.sha256, b.model.weights.sha256), ("dtype", a.dtype, b.dtype),
                       ("build shapes", a.shapes.build, b.shapes.build), ("device", a.device, b.device)):
        if x != y:
            raise SvdExportError(f"--against must be a static engine of the same model at the ranged engine's "
                                 f"optimal shape: its {what} differ ({y} vs {x})")


def _graph_fns(prefix: str, engine, state: dict) -> dict[str, Callable[[], object]]:
    m = engine.manifest
    return {f"{prefix}_full": graph_call(engine.full, state, m.graphs["full"].input_dtypes),
            f"{prefix}_cached": graph_call(engine.cached, state, m.graphs["cached"].input_dtypes)}


@torch.inference_mode()
def bench_shapes(engine_dir: str, against: str | None, resolutions: list[tuple[int, int]], steps: int = 50,
                 repeats: int = 5, step_calls: int = 10, e2e_repeats: int = 3) -> dict:
    import svdexport

    engine = svdexport.load(engine_dir)
    shapes = [engine.request_shapes(height=h, width=w) for h, w in resolutions]  # out of range: before the work
    eager = engine.eager_reference()
    report = {"engine": str(engine_dir), "backend": engine.manifest.backend, "dtype": engine.manifest.dtype,
              "device": str(engine.device), "optimal": engine.shapes.to_dict(), "steps": steps,
              "range": [engine.manifest.shapes.min, engine.manifest.shapes.max],
              "method": f"medians of {repeats} interleaved repeats ({step_calls} calls per step timing), "
                        f"{e2e_repeats} interleaved generations of {steps} steps with SVD-Cache"}
    if against:
        static = svdexport.load(against)
        _same_build(engine, static)
        state = step_state(engine, eager)
        s = _medians({**_graph_fns("ranged", engine, state), **_graph_fns("static", static, state)},
                     repeats, step_calls)
        inputs = engine.example_inputs(0)
        e = _e2e({"ranged": lambda: engine.generate(inputs, steps=steps),
                  "static": lambda: static.generate(inputs, steps=steps)}, e2e_repeats)
        ratio = s["ranged_full"] / s["static_full"]
        report["against"] = {"static": str(against), "step_seconds": s, "e2e_seconds": e, "ratios": {
            "full_step_ranged_vs_static": ratio, "cached_step_ranged_vs_static": s["ranged_cached"] / s["static_cached"],
            "e2e_ranged_vs_static": e["ranged"] / e["static"]},
            "target": {"full_step_ranged_vs_static": f"<= {TARGET}", "met": ratio <= TARGET}}
        static.close()
    rows = []
    for sh in shapes:
        state = step_state(engine, eager, sh)
        s = _medians({**_graph_fns("engine", engine, state),
                      "eager_full": graph_call(eager.full, state)}, repeats, step_calls)
        inputs = engine.example_inputs(0, shapes=sh)
        e = _e2e({"engine": lambda: engine.generate(inputs, steps=steps, height=sh.height, width=sh.width)},
                 e2e_repeats)
        rows.append({"height": sh.height, "width": sh.width, "tokens": sh.img_tokens, "step_seconds": s,
                     "e2e_seconds": e["engine"]})
    report["resolutions"] = rows
    engine.close()
    return report


def format_shapes_report(r: dict) -> str:
    lines = [f"ranged engine {r['engine']} ({r['backend']}, {r['device']}, {r['dtype']}), optimal {r['optimal']}, "
             f"range {r['range'][0]} .. {r['range'][1]}", ""]
    if "against" in r:
        a, s, e = r["against"], r["against"]["step_seconds"], r["against"]["e2e_seconds"]
        lines += ["| at the optimal shape | static engine | ranged engine | ranged / static |", "|---|---|---|---|",
                  f"| full step | {s['static_full'] * 1e3:.2f} ms | {s['ranged_full'] * 1e3:.2f} ms | "
                  f"{a['ratios']['full_step_ranged_vs_static']:.3f}x |",
                  f"| cached step | {s['static_cached'] * 1e3:.2f} ms | {s['ranged_cached'] * 1e3:.2f} ms | "
                  f"{a['ratios']['cached_step_ranged_vs_static']:.3f}x |",
                  f"| {r['steps']} steps, SVD-Cache | {e['static']:.3f} s | {e['ranged']:.3f} s | "
                  f"{a['ratios']['e2e_ranged_vs_static']:.3f}x |", "",
                  f"target: ranged full step <= {TARGET}x the static one ({a['static']}): "
                  f"{a['ratios']['full_step_ranged_vs_static']:.3f} ({'met' if a['target']['met'] else 'NOT met'})", ""]
    if r["resolutions"]:
        lines += ["| resolution | image tokens | full step | cached step | eager full step | engine / eager full | "
                  f"{r['steps']} steps, SVD-Cache |", "|---|---|---|---|---|---|---|"]
        for row in r["resolutions"]:
            s = row["step_seconds"]
            lines.append(f"| {row['height']}x{row['width']} | {row['tokens']} | {s['engine_full'] * 1e3:.2f} ms | "
                         f"{s['engine_cached'] * 1e3:.2f} ms | {s['eager_full'] * 1e3:.2f} ms | "
                         f"{s['engine_full'] / s['eager_full']:.2f}x | {row['e2e_seconds']:.3f} s |")
        lines.append("")
    lines.append(f"method: {r['method']}")
    return "\n".join(lines)
