"""Cached vs uncached, measured in one process: `svdexport bench speedup ENGINE [ENGINE ...]`.

For each engine, runs interval 1 (every step full) and the engine's own schedule interleaved, `repeats`
times, and reports medians, the block-evaluation ratio, the wall-time ratio and, per predictor, the
relative L2 distance of the final latents to full compute (same seed and inputs).
"""

from __future__ import annotations

import statistics

import svdexport
from svdexport.bench.metrics import rel_l2


def measure(engine_dir: str, steps: int, repeats: int, seeds: int, predictors: list[str]) -> list[dict]:
    engine = svdexport.load(engine_dir)
    cache = engine.cache
    inputs = [engine.example_inputs(seed) for seed in range(seeds)]
    engine.generate(inputs[0], steps=2)  # warm-up: first calls pay one-time costs
    times = {"full": [], "cached": []}
    for _ in range(repeats):  # interleaved, so drifts of the machine hit both alike
        times["full"].append(engine.generate(inputs[0], steps=steps, interval=1).seconds)
        times["cached"].append(engine.generate(inputs[0], steps=steps).seconds)
    reference = [engine.generate(x, steps=steps, interval=1).latents for x in inputs]
    full_s, cached_s = statistics.median(times["full"]), statistics.median(times["cached"])
    rows = []
    for name in predictors:
        runs = [engine.generate(x, steps=steps, predictor=name) for x in inputs]
        rows.append({
            "engine": engine_dir, "granularity": cache.granularity, "predictor": name, "beta": cache.beta,
            "order": cache.order, "warmup": cache.warmup, "interval": cache.interval,
            "full_steps": runs[0].full_steps, "steps": steps,
            "block_eval_ratio": steps / runs[0].full_steps,
            "uncached_s": full_s, "cached_s": cached_s, "wall_ratio": full_s / cached_s,
            "rel_l2": statistics.mean(rel_l2(r.latents, ref) for r, ref in zip(runs, reference)),
        })
    return rows


def format_rows(rows: list[dict]) -> str:
    """The rows of `measure` as a markdown table."""
    lines = ["| engine | granularity | predictor | full/total steps | block-eval ratio | uncached s | cached s "
             "| wall ratio | rel L2 vs full |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['granularity']} | {r['predictor']} | {r['full_steps']}/{r['steps']} "
                     f"| {r['block_eval_ratio']:.2f}x | {r['uncached_s']:.3f} | {r['cached_s']:.3f} "
                     f"| {r['wall_ratio']:.2f}x | {r['rel_l2']:.4f} |")
    return "\n".join(lines)
