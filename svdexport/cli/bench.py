"""`svdexport bench`: measurements of built engines, one subcommand each.

- `bench ENGINE` (= `bench latency ENGINE`): step and end-to-end latency against eager PyTorch, as ratios;
- `bench lora ENGINE --lora FILE`: LoRA load and unload against a rebuild of the engine;
- `bench shapes RANGED --against STATIC --resolutions HxW,...`: what a shape range costs;
- `bench speedup ENGINE...`: cached against uncached generation, with the distance to full compute;
- `bench scaling ENGINE`: batch throughput against the number of Ray workers.
Every option and output path is checked before the work."""

from __future__ import annotations

import argparse
from pathlib import Path

from svdexport.cli.common import add_engine, add_force, add_trust_args, apply_trust_args, check_outputs, gone
from svdexport.cli.common import int_list, peek, write_json
from svdexport.errors import SvdExportError

SUBCOMMANDS = ("latency", "lora", "shapes", "speedup", "scaling")


def add_bench(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", required=True, metavar="{latency,lora,shapes,speedup,scaling}",
                           help="`bench ENGINE` is `bench latency ENGINE`")
    helps = {"latency": "step and end-to-end latency against eager PyTorch, as ratios (the default: bench ENGINE)",
             "lora": "seconds to load LoRAs into the engine against a rebuild of it, in the same run",
             "shapes": "a ranged engine against a static one of its optimal shape, and its latency per resolution",
             "speedup": "cached against uncached generation in one process, with the distance to full compute",
             "scaling": "batch throughput against the number of Ray workers (needs Ray)"}
    adders = {"latency": _add_latency, "lora": _add_lora, "shapes": _add_shapes, "speedup": _add_speedup,
              "scaling": _add_scaling}
    for name in SUBCOMMANDS:
        adders[name](sub.add_parser(name, help=helps[name], description=helps[name]))


def _timings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats of the step timings (default 5)")
    p.add_argument("--step-calls", type=int, default=10, help="calls per step timing (default 10)")
    p.add_argument("--e2e-repeats", type=int, default=3, help="interleaved repeats of whole generations (default 3)")


def _report(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", help="also write the measurements to this JSON file")
    add_force(p)
    add_trust_args(p)


def _add_latency(p: argparse.ArgumentParser) -> None:
    add_engine(p)
    _timings(p)
    _report(p)
    gone(p, {"--lora": "is `svdexport bench lora ENGINE --lora FILE` now",
             "--no-rebuild": "is `svdexport bench lora ENGINE --lora FILE --no-rebuild` now",
             "--against": "is `svdexport bench shapes ENGINE --against STATIC` now",
             "--resolutions": "is `svdexport bench shapes ENGINE --resolutions HxW,...` now"})
    p.set_defaults(func=cmd_latency)


def _add_lora(p: argparse.ArgumentParser) -> None:
    add_engine(p)
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:SCALE]",
                   help="LoRA .safetensors to load (SCALE default 1); repeatable")
    p.add_argument("--no-rebuild", action="store_true", help="time only the LoRA load and unload")
    p.add_argument("--repeats", type=int, default=3, help="loads and unloads timed (default 3)")
    _report(p)
    p.set_defaults(func=cmd_lora)


def _add_shapes(p: argparse.ArgumentParser) -> None:
    p.add_argument("engine", metavar="RANGED", help="a ranged engine folder written by build")
    p.add_argument("--against", metavar="STATIC", help="a static engine of RANGED's optimal shape: full step, cached "
                   "step and generation of RANGED against it, side by side")
    p.add_argument("--resolutions", metavar="HxW,...", help="latency of RANGED per resolution, e.g. "
                   "96x96,128x128,160x160")
    _timings(p)
    _report(p)
    p.set_defaults(func=cmd_shapes)


def _add_speedup(p: argparse.ArgumentParser) -> None:
    p.add_argument("engines", nargs="+", metavar="ENGINE", help="engine folders written by build")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each generation (default 3)")
    p.add_argument("--seeds", type=int, default=4, help="inputs averaged for the quality column (default 4)")
    p.add_argument("--predictors", metavar="NAME,...", help="predictors to compare (default: the engine's)")
    add_trust_args(p)
    p.set_defaults(func=cmd_speedup)


def _add_scaling(p: argparse.ArgumentParser) -> None:
    add_engine(p)
    p.add_argument("--items", type=int, default=64, help="items per run (default 64)")
    p.add_argument("--workers", default="1,2", metavar="N,...", help="worker counts, alternated (default 1,2)")
    p.add_argument("--repeats", type=int, default=2, help="runs per worker count (default 2)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the engine's)")
    p.add_argument("--plot", help="PNG of images per minute against workers")
    p.add_argument("--json", help="also write the measurements to this JSON file")
    add_force(p)
    p.set_defaults(func=cmd_scaling)


def _at_least_one(a: argparse.Namespace, names: tuple[str, ...]) -> None:
    if min(getattr(a, n) for n in names) < 1:
        raise SvdExportError(f"{', '.join('--' + n.replace('_', '-') for n in names)} must be >= 1")


def cmd_latency(a: argparse.Namespace) -> None:
    from svdexport.bench.latency import bench, format_report

    _at_least_one(a, ("steps", "repeats", "step_calls", "e2e_repeats"))
    apply_trust_args(a)
    peek(a.engine)  # a missing engine fails first
    check_outputs([("--json", a.json)], a.force)
    report = bench(a.engine, steps=a.steps, repeats=a.repeats, step_calls=a.step_calls, e2e_repeats=a.e2e_repeats)
    print(format_report(report))
    write_json(a.json, report)


def cmd_lora(a: argparse.Namespace) -> None:
    from svdexport.bench.lora import bench_lora, format_lora_report
    from svdexport.models import family
    from svdexport.runtime.loras import check_lora_options

    _at_least_one(a, ("repeats",))
    apply_trust_args(a)
    manifest = peek(a.engine)
    loras = check_lora_options(a.lora, manifest.backend, family(manifest.model.family), a.no_rebuild,
                               manifest.backend_options)
    check_outputs([("--json", a.json)], a.force)
    report = bench_lora(a.engine, loras, repeats=a.repeats, rebuild=not a.no_rebuild)
    print(format_lora_report(report))
    write_json(a.json, report)


def cmd_shapes(a: argparse.Namespace) -> None:
    from svdexport.bench.shapes import bench_shapes, format_shapes_report, parse_resolutions
    from svdexport.models import family
    from svdexport.runtime.manifest import EngineKind

    _at_least_one(a, ("steps", "repeats", "step_calls", "e2e_repeats"))
    if not a.against and not a.resolutions:
        raise SvdExportError("bench shapes measures --against STATIC, --resolutions HxW,... or both: give one")
    apply_trust_args(a)
    resolutions = parse_resolutions(a.resolutions)
    manifest = peek(a.engine)
    if manifest.shapes.kind is not EngineKind.RANGED:
        raise SvdExportError(f"{a.engine} is a static engine: bench shapes measures a ranged one")
    served = manifest.shapes.range(family(manifest.model.family))
    for h, w in resolutions:
        served.request(height=h, width=w)
    if a.against:
        peek(a.against)
    check_outputs([("--json", a.json)], a.force)
    report = bench_shapes(a.engine, a.against, resolutions, steps=a.steps, repeats=a.repeats,
                          step_calls=a.step_calls, e2e_repeats=a.e2e_repeats)
    print(format_shapes_report(report))
    write_json(a.json, report)


def cmd_speedup(a: argparse.Namespace) -> None:
    from svdexport.bench.speedup import format_rows, measure
    from svdexport.cache.predictors import PREDICTORS

    _at_least_one(a, ("steps", "repeats", "seeds"))
    apply_trust_args(a)
    chosen = a.predictors.split(",") if a.predictors else []
    if unknown := [n for n in chosen if n not in PREDICTORS]:
        raise SvdExportError(f"--predictors: unknown predictor {unknown[0]!r} (choose from {', '.join(PREDICTORS)})")
    manifests = [peek(e) for e in a.engines]  # every engine before the first measurement
    rows = [r for e, m in zip(a.engines, manifests)
            for r in measure(e, a.steps, a.repeats, a.seeds, chosen or [m.cache.predictor])]
    print(format_rows(rows))


def cmd_scaling(a: argparse.Namespace) -> None:
    from svdexport.bench.scaling import format_result, measure, plot

    workers = list(int_list(a.workers, "--workers"))
    if not workers or min(workers) < 1:
        raise SvdExportError(f"--workers must be a comma list of counts >= 1, got {a.workers!r}")
    _at_least_one(a, ("items", "repeats"))
    peek(a.engine)
    check_outputs([("--plot", a.plot), ("--json", a.json)], a.force)
    result = measure(a.engine, a.items, workers, a.repeats, a.steps)
    print(format_result(result))
    if a.plot:
        plot(result, Path(a.plot))
    write_json(a.json, result)
