"""`svdexport build` (weights -> bases -> plans -> exported graphs -> engine folder) and `svdexport calibrate`
(the bases alone, for `build --bases FILE`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from svdexport.cli import options as o
from svdexport.cli.common import add_force


def add_build(p: argparse.ArgumentParser) -> None:
    from svdexport.cli.family_help import family_help  # torch and the families: only when build is parsed

    h = family_help()
    o.add_model_group(p, h)
    o.add_shape_group(p, h)
    o.add_calibration_group(p, h, "build")
    o.add_forecast_group(p, h)
    o.add_plan_group(p, h)
    o.add_range_group(p, h)
    o.add_backend_group(p, h)
    g = p.add_argument_group("output")
    g.add_argument("--out", help="engine folder (default engines/MODEL-BACKEND)")
    o.add_verbose(g)
    add_force(g, "outputs")
    p.set_defaults(func=cmd_build)


def add_calibrate(p: argparse.ArgumentParser) -> None:
    from svdexport.cli.family_help import family_help

    h = family_help()
    o.add_model_group(p, h)
    o.add_shape_group(p, h)
    o.add_calibration_group(p, h, "calibrate")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="bases file, .safetensors (for build --bases FILE)")
    o.add_verbose(g)
    add_force(g, "outputs")
    p.set_defaults(func=cmd_calibrate)


def cmd_build(a: argparse.Namespace) -> None:
    from svdexport.builder.build import build

    opts = o.build_options(a, "build")
    out = Path(a.out or f"engines/{a.model}-{a.backend}")
    m, reused = build(opts, out, graphs_dir=a.graphs)
    print(f"dtype {opts.dtype}: {opts.dtype_reason}")
    if reused:
        print(f"{out} is up to date (same model, weights, settings and library versions): reused")
        return
    g = m.graphs
    ranks = ", ".join(f"{s.name}:{s.rank}" for s in m.sites)
    shapes = m.shapes
    ranged = f", range {shapes.min} .. {shapes.max}" if shapes.max else ""
    print(f"built {out} ({m.backend}, {m.device}, {m.dtype}, {shapes.kind.value}, shapes {shapes.build}{ranged})")
    if m.graphs_dir:
        print(f"exported graphs in {m.graphs_dir}")
    print(f"parameters: full graph {g['full'].parameters:,}, cached-step graph {g['cached'].parameters:,}")
    if m.attention is not None:
        print(f"attention: {m.attention.option} over the {'x'.join(map(str, m.attention.grid))} token grid: the mask "
              f"keeps {m.attention.kept:.0%} of the pairs, {m.attention.blocks_computed:.0%} of the blocks computed")
    given = f"; from {opts.bases}" if opts.bases else ""
    print(f"ranks (tau {m.calibration.tau}, k_max {m.calibration.k_max}{given}): {ranks}")
    for plan in m.plans:
        than = f"; {plan.cost / plan.uniform_cost:.2f}x the uniform plan's" if plan.uniform_cost else ""
        how = f"refined: {plan.score:.2f} dB on the calibration inputs" if plan.refined else f"forecast error{than}"
        print(f"calibrated plan of {plan.steps} steps: full steps {' '.join(map(str, plan.full_steps))} ({how})")
    mem, gib = m.memory, 2**30
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    if m.bound is not None and m.bound.referenced:
        where = Path(m.bound.referenced[0].path).parent
        print(f"weights: referenced, not copied: {m.bound.referenced_bytes / gib:.2f} GiB in {len(m.bound.referenced)} "
              f"file(s) of {where} (by sha256); the engine keeps {m.bound.embedded_bytes / 2**20:.1f} MiB itself")
    elif m.bound is not None:
        print(f"weights: kept inside the engine ({m.bound.embedded_bytes / gib:.2f} GiB)")
    print(f"memory: estimated peak {mem['peak_bytes'] / gib:.1f} GiB, measured peak RSS "
          f"{mem['measured_peak_rss_bytes'] / gib:.1f} GiB ({mem['available_bytes'] / gib:.1f} GiB were available); "
          f"engine files {size / gib:.2f} GiB; {m.build_seconds:.0f} s")


def cmd_calibrate(a: argparse.Namespace) -> None:
    from svdexport.builder.calibrate_only import calibrate_to_file

    bases = calibrate_to_file(o.build_options(a, "calibrate"), Path(a.out))
    print(f"wrote {a.out}: {len(bases.sites)} sites, ranks {bases.ranks}, "
          f"{bases.num_inputs} inputs x {bases.num_timesteps} timesteps (for build --bases {a.out})")
