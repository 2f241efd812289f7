"""Command line: `svdexport build | calibrate | run | compare | batch | bench | keygen | sign`. User errors
(SvdExportError, bad arguments) and I/O faults (OSError) print one line and exit with status 2; nothing else is
caught, so a bug still shows its traceback. Every command checks its options and output paths before its work."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from svdexport.commands import Parser, add_force, add_trust_args, apply_trust_args, cmd_keygen, cmd_run, cmd_sign
from svdexport.commands import cmd_bench_shapes, model_help
from svdexport.options import add_shape_args, build_options, int_list, lora_args, model_args, shapes_line
from svdexport.errors import SvdExportError, one_line
from svdexport.outputs import check_files
from svdexport import quiet
from svdexport.runtime import trust
from svdexport.commands import bench_with_lora

def cmd_build(a: argparse.Namespace) -> None:
    from svdexport.builder.build import build

    opts = build_options(a, a.backend)
    out = Path(a.out or f"engines/{a.model}-{a.backend}")
    m, reused = build(opts, out, graphs_dir=a.graphs)
    print(f"dtype {opts.dtype}: {opts.dtype_reason}")
    if reused:
        print(f"{out} is up to date (same model, weights, settings and library versions): reused")
        return
    g = m.graphs
    ranks = ", ".join(f"{s.name}:{s.rank}" for s in m.sites)
    print(f"built {out} ({m.backend}, {m.device}, {m.dtype}, {shapes_line(m.shapes)})")
    if m.graphs_dir:
        print(f"exported graphs in {m.graphs_dir}")
    print(f"parameters: full graph {g['full'].parameters:,}, cached-step graph {g['cached'].parameters:,}")
    print(f"ranks (tau {m.calibration.tau}, k_max {m.calibration.k_max}): {ranks}")
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
    from svdexport.builder.build import calibrate_to_file

    bases = calibrate_to_file(build_options(a), Path(a.out))
    print(f"wrote {a.out}: {len(bases.sites)} sites, ranks {bases.ranks}, "
          f"{bases.num_inputs} inputs x {bases.num_timesteps} timesteps")


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="svdexport", description="SVD-Cache DiT engines: build, calibrate, run, compare, batch, bench; "
               "keygen and sign for trusted engines.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="calibrate the bases and build an engine folder")
    model_args(b)
    b.add_argument("--backend", default="eager", help=f"{model_help()['backends']} (default: eager)")
    b.add_argument("--out", help="engine folder (default engines/MODEL-BACKEND)")
    b.add_argument("--graphs", help="folder for the exported programs (default graphs/NAME of --out)")
    b.add_argument("--embed-weights", action="store_true", help="keep the weights inside the engine (a "
                   "self-contained engine to ship); default: an engine built from a local checkpoint references "
                   "its files by sha256 and maps them at load (bundled models are always kept inside)")
    add_shape_args(b, "build")
    b.set_defaults(func=cmd_build)

    c = sub.add_parser("calibrate", help="only compute the low-rank bases (safetensors)")
    model_args(c)
    c.add_argument("--out", required=True, help="bases file, .safetensors")
    c.set_defaults(func=cmd_calibrate)

    r = sub.add_parser("run", help="generate with an engine; writes the latents and a PNG preview")
    r.add_argument("engine", help="engine folder written by build")
    r.add_argument("--steps", type=int, help="sampling steps (default: the model's, FLUX.1-dev 50, schnell 4)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--prompt", action="append", help="text prompt, through the whole pipeline (FluxPipeline, "
                   "HunyuanVideoPipeline) of the engine's weights folder; repeat for a batch (at most the engine's --batch)")
    r.add_argument("--guidance-scale", type=float, help="embedded guidance (default: the model's; FLUX.1-dev 3.5, "
                   "HunyuanVideo 6.0)")
    r.add_argument("--out", help="image .png, or video .gif / .mp4 for video models (default out/ENGINE-seedS.png or "
                   ".gif); the latents go beside as .safetensors, a video's frame grid as .png")
    r.add_argument("--interval", type=int, help="override the engine's interval")
    r.add_argument("--warmup", type=int, help="override the engine's warmup")
    r.add_argument("--plan", help="calibrated | uniform (default: the engine's; --interval/--warmup imply uniform)")
    r.add_argument("--full-steps", type=int, help="full steps of the calibrated plan (default: the engine's)")
    r.add_argument("--label", type=int, help="class to generate, for class-conditioned models (bundled digits)")
    r.add_argument("--weights", metavar="PATH", help="where the checkpoint the engine references is now, if it moved "
                   "(a .safetensors file or a folder; matched to the recorded files by size and sha256)")
    add_shape_args(r, "run")
    add_force(r)
    add_trust_args(r)
    lora_args(r)
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("compare", help="quality and speed against eager, every predictor and the peer libraries, "
                       "at matched full steps")
    c.add_argument("engine", help="engine folder written by build")
    c.add_argument("--samples", type=int, default=16, help="samples of seeds 0..N-1 (default 16)")
    c.add_argument("--seeds", help="the samples' seeds instead, e.g. 5000-5031 (the held-out set: reported, "
                   "never chosen on) or 1,5,9")
    c.add_argument("--steps", type=int, default=50)
    c.add_argument("--full-steps", help="comma list of budgets: every method runs with that many full steps, "
                   "e.g. 7,9,12 (default: as many as the engine's plan has)")
    c.add_argument("--intervals", default=None, help="comma list: also the budgets of the uniform plans of these "
                   "intervals (with the engine's warmup), e.g. 7 -> 9 of 50")
    c.add_argument("--peers", default="all", help="'all', 'none' or a comma list of peer names")
    c.add_argument("--json", help="write rows and settings as JSON")
    c.add_argument("--md", help="write the tables as markdown")
    c.add_argument("--grid", help="PNG of the reference and every method side by side")
    c.add_argument("--frontier", help="PNG of PSNR against measured speedup across the budgets")
    c.add_argument("--compute", help="PNG of PSNR against full steps across the budgets")
    c.add_argument("--temporal", help="videos: PNG of the PSNR between consecutive frames, per method")
    c.add_argument("--docs", help="write a generated benchmarks page (e.g. docs/benchmarks.md) with its plots")
    add_force(c)
    add_trust_args(c)
    c.set_defaults(func=cmd_compare)
    t = sub.add_parser("batch", help="generate a prompt or class list across Ray workers (resumable)")
    t.add_argument("engine", help="engine folder written by build (the same path on every node)")
    t.add_argument("--prompts", required=True, metavar="FILE",
                   help="one prompt per line (a class name per line for class-conditioned engines)")
    t.add_argument("--out", required=True, help="output folder: NNNNNN.png + NNNNNN.json per item, metadata.jsonl")
    t.add_argument("--workers", type=int, default=1, help="Ray actors, each loading the engine once (default 1)")
    t.add_argument("--address", help="Ray cluster to join (e.g. auto, ray://head:10001); default: start a local one")
    t.add_argument("--seed", type=int, default=0, help="item i uses seed + i")
    t.add_argument("--steps", type=int, help="sampling steps (default: the engine's)")
    t.add_argument("--guidance-scale", type=float, default=3.5, help="for engines with text encoders")
    t.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs each actor reserves (1 on a GPU cluster)")
    lora_args(t)
    add_trust_args(t)
    t.set_defaults(func=cmd_batch)
    m = sub.add_parser("bench", help="step and end-to-end latency against eager PyTorch, as ratios")
    m.add_argument("engine", help="engine folder written by build")
    m.add_argument("--steps", type=int, default=50)
    m.add_argument("--repeats", type=int, default=5, help="interleaved repeats of the step timings")
    m.add_argument("--step-calls", type=int, default=10, help="calls per step timing (default 10)")
    m.add_argument("--e2e-repeats", type=int, default=3, help="interleaved repeats of whole generations")
    m.add_argument("--json", help="also write the measurements to this JSON file")
    add_shape_args(m, "bench")
    add_force(m)
    add_trust_args(m)
    m.set_defaults(func=bench_with_lora(m, cmd_bench))
    k = sub.add_parser("keygen", help="make an Ed25519 key pair for signing engines")
    k.add_argument("--out", required=True, help="private key file (mode 0600); the public key goes to OUT.pub")
    add_force(k, "key files")
    k.set_defaults(func=cmd_keygen)
    g = sub.add_parser("sign", help="sign an engine's manifest (which lists every file's sha256) with a private key")
    g.add_argument("engine", help="engine folder written by build")
    g.add_argument("--key", required=True, help="private key file from svdexport keygen")
    g.set_defaults(func=cmd_sign)
    return p


def cmd_compare(a: argparse.Namespace) -> None:
    from svdexport.bench import peers as peer_lib
    from svdexport.bench import report
    from svdexport.bench.compare import compare
    from svdexport.media import markdown_text, write_text
    from svdexport.bench.stats import parse_seeds

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
    peers = {"all": None, "none": []}.get(a.peers)
    if peers is None and a.peers != "all":
        peers = a.peers.split(",")
        unknown = [p for p in peers if p not in peer_lib.PEERS]
        if unknown:
            raise SvdExportError(f"unknown peer {unknown[0]!r} (choose from {', '.join(peer_lib.PEERS)})")
    from svdexport.models import family
    from svdexport.runtime import manifest as manifest_io

    apply_trust_args(a)
    peek = manifest_io.read(Path(a.engine), check_versions=False, hash_files=False)  # option checks only
    video = family(peek.model.family).is_video
    if a.temporal and not video:
        raise SvdExportError("--temporal is for video models; this engine makes images")
    docs = Path(a.docs) if a.docs else None
    plots = [] if docs is None else [("--docs plot", docs.with_name(f"{docs.stem}_{k}.png"))
                                     for k in ("frontier", "compute", "grid") + (("temporal",) if video else ())]
    check_files([("--json", a.json), ("--md", a.md), ("--grid", a.grid), ("--frontier", a.frontier),
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


def cmd_batch(a: argparse.Namespace) -> None:
    from svdexport.batch.runner import BatchOptions, run

    keys = apply_trust_args(a)
    summary = run(BatchOptions(engine=a.engine, items=a.prompts, out=a.out, workers=a.workers, address=a.address,
                               seed=a.seed, steps=a.steps, guidance_scale=a.guidance_scale, loras=a.lora or [],
                               gpus_per_worker=a.gpus_per_worker, trusted_keys=[str(k) for k in keys]))
    print(f"{a.out}: {summary.line()}")
    if summary.failed:
        first = next(iter(summary.failed.items()))
        raise SvdExportError(f"{len(summary.failed)} items failed (item {first[0]}: {first[1]}); rerun to retry "
                             f"them, the finished ones are kept (see {a.out}/summary.json)")


def cmd_bench(a: argparse.Namespace) -> None:
    from svdexport.bench.latency import bench, format_report
    from svdexport.media import json_text, write_text
    from svdexport.runtime import manifest as manifest_io

    if min(a.steps, a.repeats, a.e2e_repeats, a.step_calls) < 1:
        raise SvdExportError("--steps, --repeats, --step-calls and --e2e-repeats must be >= 1")
    apply_trust_args(a)
    if a.against or a.resolutions:
        return cmd_bench_shapes(a)
    manifest_io.read(Path(a.engine), check_versions=False, hash_files=False)  # a missing engine fails first
    check_files([("--json", a.json)], a.force)
    report = bench(a.engine, steps=a.steps, repeats=a.repeats, step_calls=a.step_calls, e2e_repeats=a.e2e_repeats)
    print(format_report(report))
    if a.json:
        write_text(json_text(report), Path(a.json))


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or argparse's one-line error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    import warnings

    from diffusers.utils import logging as diffusers_logging

    # torch.export's pytree emits this FutureWarning through copyreg on every save; it is not the user's concern.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()  # loading bars; svdexport shows its own for long work
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    # Options that commands pass on through the environment (to their workers) end with the command.
    saved = {k: os.environ.get(k) for k in (trust.ENV, quiet.ENV)}
    try:
        args.func(args)
    except (SvdExportError, OSError) as e:  # OSError: a full disk, EIO; the atomic writes kept the old files
        print(f"svdexport: error: {one_line(e, getattr(args, 'out', None))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("svdexport: interrupted", file=sys.stderr)
        return 130
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
