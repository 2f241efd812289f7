"""`svdexport compare ENGINE`: quality and speed against eager, every predictor and the peer libraries, at matched
full steps (bench/compare.py), as tables, JSON, plots or a generated docs page."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from svdexport.cli.common import add_engine, add_force, add_trust_args, apply_trust_args, check_outputs, int_list, peek
from svdexport.errors import SvdExportError


def add_compare(p: argparse.ArgumentParser) -> None:
    add_engine(p)
    p.add_argument("--samples", type=int, default=16, help="samples of seeds 0..N-1 (default 16)")
    p.add_argument("--seeds", help="the samples' seeds instead, e.g. 5000-5031 (the held-out set: reported, "
                   "never chosen on) or 1,5,9")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--full-steps", help="comma list of budgets: every method runs with that many full steps, "
                   "e.g. 7,9,12 (default: as many as the engine's plan has)")
    p.add_argument("--intervals", default=None, help="comma list: also the budgets of the uniform plans of these "
                   "intervals (with the engine's warmup), e.g. 7 -> 9 of 50")
    p.add_argument("--peers", default="all", help="'all', 'none' or a comma list of peer names")
    g = p.add_argument_group("outputs")
    g.add_argument("--json", help="write rows and settings as JSON")
    g.add_argument("--md", help="write the tables as markdown")
    g.add_argument("--grid", help="PNG of the reference and every method side by side")
    g.add_argument("--frontier", help="PNG of PSNR against measured speedup across the budgets")
    g.add_argument("--compute", help="PNG of PSNR against full steps across the budgets")
    g.add_argument("--temporal", help="videos: PNG of the PSNR between consecutive frames, per method")
    g.add_argument("--docs", help="write a generated benchmarks page (e.g. docs/benchmarks.md) with its plots")
    add_force(g)
    add_trust_args(p)
    p.set_defaults(func=cmd_compare)


def _peers(text: str) -> list[str] | None:
    """None: every peer; else the named ones, each known."""
    from svdexport.bench import peers as peer_lib

    if text == "all":
        return None
    if text == "none":
        return []
    names = text.split(",")
    unknown = [n for n in names if n not in peer_lib.PEERS]
    if unknown:
        raise SvdExportError(f"unknown peer {unknown[0]!r} (choose from {', '.join(peer_lib.PEERS)})")
    return names


def cmd_compare(a: argparse.Namespace) -> None:
    from svdexport.bench import report
    from svdexport.bench.compare import compare
    from svdexport.bench.stats import parse_seeds
    from svdexport.media import markdown_text, write_text
    from svdexport.models import family

    budgets, intervals = int_list(a.full_steps, "--full-steps"), int_list(a.intervals, "--intervals")
    if min((*budgets, *intervals, a.samples, a.steps)) < 1:
        raise SvdExportError("--full-steps, --intervals, --samples and --steps must be >= 1")
    if max(budgets, default=1) > a.steps:
        raise SvdExportError(f"--full-steps can be at most --steps ({a.steps}), got {max(budgets)}")
    try:
        seeds = parse_seeds(a.seeds) if a.seeds else None
    except ValueError:
        raise SvdExportError(f"--seeds must be a range A-B or a comma list of integers, got {a.seeds!r}") from None
    if seeds is not None and min(seeds) < 0:
        raise SvdExportError(f"--seeds must be >= 0, got {a.seeds!r}")
    peers = _peers(a.peers)
    apply_trust_args(a)
    video = family(peek(a.engine).model.family).is_video
    if a.temporal and not video:
        raise SvdExportError("--temporal is for video models; this engine makes images")
    docs = Path(a.docs) if a.docs else None
    plots = [] if docs is None else [("--docs plot", docs.with_name(f"{docs.stem}_{k}.png"))
                                     for k in ("frontier", "compute", "grid") + (("temporal",) if video else ())]
    check_outputs([("--json", a.json), ("--md", a.md), ("--grid", a.grid), ("--frontier", a.frontier),
                   ("--compute", a.compute), ("--temporal", a.temporal), ("--docs", docs), *plots], a.force)
    result = compare(a.engine, samples=a.samples, steps=a.steps, budgets=budgets, peers=peers, seeds=seeds,
                     intervals=intervals)
    print(report.markdown(result))
    for path, text in ((a.json, report.to_json(result)), (a.md, markdown_text(report.markdown(result)))):
        if path:
            write_text(text, Path(path))
    budget = report.main_budget(result)
    if a.grid:
        report.grid(result, Path(a.grid), budget)
    if a.frontier:
        report.frontier_plot(result, Path(a.frontier), "speedup")
    if a.compute:
        report.frontier_plot(result, Path(a.compute), "full_steps")
    if a.temporal:
        report.temporal_plot(result, Path(a.temporal), budget)
    if docs:
        report.write_docs(result, docs, "svdexport " + " ".join(sys.argv[1:]))
