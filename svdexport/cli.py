"""Command line: `svdexport build | calibrate | run | bench`.

User errors (SvdExportError, bad arguments) print one line and exit with status 2; nothing else is caught,
so a bug still shows its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from svdexport.cache.config import GRANULARITIES, CacheConfig
from svdexport.cache.predictors import PREDICTORS
from svdexport.errors import SvdExportError
from svdexport.export import BACKENDS
from svdexport.files import atomic_file

DEFAULTS = CacheConfig()


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="flux", help="DiT family (default: flux)")
    g.add_argument("--weights", help="local diffusers folder or transformer .safetensors (default: bundled model)")
    g.add_argument("--dtype", default="auto", help="fp32 | bf16 | fp16 | auto (default: bf16 on CUDA and on CPUs with bf16 "
                   "matrix units, fp32 elsewhere and for onnx on CPU; build prints why)")
    g.add_argument("--device", default="auto", help="cpu | cuda | auto (default: cuda when a GPU is visible)")
    s = p.add_argument_group("build shapes (fixed per engine)")
    s.add_argument("--batch", type=int, help="images per call (default 1)")
    s.add_argument("--height", type=int, help="image height in pixels (default 512; 1024 for FLUX.1)")
    s.add_argument("--width", type=int, help="image width in pixels (default 512; 1024 for FLUX.1)")
    s.add_argument("--text-len", type=int, help="text tokens (default 64; 512 for FLUX.1)")
    s.add_argument("--frames", type=int, help="video frames, 4k + 1 (video models; default 9 for the bundled one)")
    c = p.add_argument_group("SVD-Cache")
    c.add_argument("--granularity", default=DEFAULTS.granularity, help=f"{' | '.join(GRANULARITIES)}")
    c.add_argument("--predictor", default=DEFAULTS.predictor, help=f"{' | '.join(PREDICTORS)}")
    c.add_argument("--beta", type=float, default=DEFAULTS.beta, help="EMA weight on the old value")
    c.add_argument("--order", type=int, default=DEFAULTS.order, help="svd-taylor order, 1 or 2")
    c.add_argument("--tau", type=float, default=DEFAULTS.tau, help="energy kept by the principal subspace")
    c.add_argument("--k-max", type=int, default=DEFAULTS.k_max, help="rank cap per site (bases padded to it)")
    c.add_argument("--warmup", type=int, help="first full steps (default: the model's; FLUX.1-dev 3, schnell 1)")
    c.add_argument("--interval", type=int, help="one full step every N after warmup (default: dev 7, schnell 2)")
    k = p.add_argument_group("calibration")
    k.add_argument("--calib-samples", type=int, default=8, help="reference inputs (default 8)")
    k.add_argument("--calib-steps", type=int, help="sampling steps per input (default: the model's, dev 50, schnell 4)")
    k.add_argument("--calibration-prompts", metavar="FILE",
                   help="prompts, one per line, for models with text encoders (default: a built-in list of 16)")
    k.add_argument("--no-memory-check", action="store_true",
                   help="build even when the estimated peak memory exceeds what is available")


def _build_options(a: argparse.Namespace, backend: str = "eager"):
    from svdexport.models import family
    from svdexport.build.builder import BuildOptions

    family(a.model)  # an unknown family fails here, before any work
    cache = CacheConfig(granularity=a.granularity, predictor=a.predictor, beta=a.beta, order=a.order, tau=a.tau,
                        k_max=a.k_max, warmup=a.warmup, interval=a.interval)
    shapes = {k: v for k, v in (("batch", a.batch), ("height", a.height), ("width", a.width),
                                ("text_len", a.text_len), ("frames", a.frames)) if v is not None}
    return BuildOptions(model=a.model, weights=a.weights, backend=backend, cache=cache, shapes=shapes,
                        dtype=a.dtype, device=a.device, calib_samples=a.calib_samples, calib_steps=a.calib_steps,
                        calibration_prompts=a.calibration_prompts, check_memory=not a.no_memory_check)


def cmd_build(a: argparse.Namespace) -> None:
    from svdexport.build.builder import build

    opts = _build_options(a, a.backend)
    out = Path(a.out or f"engines/{a.model}-{a.backend}")
    m, reused = build(opts, out, graphs_dir=a.graphs)
    print(f"dtype {opts.dtype}: {opts.dtype_reason}")
    if reused:
        print(f"{out} is up to date (same model, weights, settings and library versions): reused")
        return
    g = m.graphs
    ranks = ", ".join(f"{s.name}:{s.rank}" for s in m.sites)
    print(f"built {out} ({m.backend}, {m.device}, {m.dtype}, shapes {m.shapes.build})")
    if m.graphs_dir:
        print(f"exported graphs in {m.graphs_dir}")
    print(f"parameters: full graph {g['full'].parameters:,}, cached-step graph {g['cached'].parameters:,}")
    print(f"ranks (tau {m.calibration.tau}, k_max {m.calibration.k_max}): {ranks}")
    mem, gib = m.memory, 2**30
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"memory: estimated peak {mem['peak_bytes'] / gib:.1f} GiB, measured peak RSS "
          f"{mem['measured_peak_rss_bytes'] / gib:.1f} GiB ({mem['available_bytes'] / gib:.1f} GiB were available); "
          f"engine files {size / gib:.2f} GiB; {m.build_seconds:.0f} s")


def cmd_calibrate(a: argparse.Namespace) -> None:
    from svdexport.build.builder import calibrate_to_file

    bases = calibrate_to_file(_build_options(a), Path(a.out))
    print(f"wrote {a.out}: {len(bases.sites)} sites, ranks {bases.ranks}, "
          f"{bases.num_inputs} inputs x {bases.num_timesteps} timesteps")


def cmd_run(a: argparse.Namespace) -> None:
    import svdexport
    from svdexport.runtime.manifest import ConditioningKind

    if a.steps is not None and a.steps < 1:
        raise SvdExportError(f"--steps must be >= 1, got {a.steps}")
    out = Path(a.out or f"out/{Path(a.engine).name}-seed{a.seed}.png")
    if out.suffix.lower() != ".png":
        raise SvdExportError(f"--out must end in .png, got {out}")
    engine = svdexport.load(a.engine)
    steps = a.steps or engine.steps
    overrides = {k: v for k, v in (("interval", a.interval), ("warmup", a.warmup)) if v is not None}
    if a.prompt:
        if a.label is not None:
            raise SvdExportError("--label is for class-conditioned models; --prompt for text-conditioned ones")
        _run_prompt(a, engine, steps, overrides, out)
        return
    if engine.conditioning is ConditioningKind.PIPELINE:
        raise SvdExportError("this engine's model has text encoders: give --prompt \"...\"")
    labels = None if a.label is None else [a.label] * engine.shapes.batch
    result = engine.generate(seed=a.seed, steps=steps, progress=True, labels=labels, **overrides)
    latents_path = out.with_suffix(".safetensors")
    _write_latents(result.latents, latents_path, {"seed": str(a.seed), "steps": str(steps), "engine": str(a.engine)})
    with atomic_file(out) as tmp:
        engine.preview(result.latents).save(tmp, format="PNG")
    what = "image" if engine.labels else "preview of the latents"  # the digits model's latents are pixels
    if engine.family.is_video:
        what = "frame grid of the latents"
        for k, frames in enumerate(engine.family.video_frames(result.latents, engine.shapes)):
            gif = out.with_suffix(".gif") if k == 0 else out.with_name(f"{out.stem}-{k}.gif")
            with atomic_file(gif) as tmp:
                frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=150, loop=0)
            print(f"wrote {gif} (video, {len(frames)} latent frames)")
    print(f"wrote {out} ({what}) and {latents_path} (final latents)")
    print(f"{steps} steps: {result.full_steps} full, {result.cached_steps} cached, {result.seconds:.2f} s")


def _write_latents(latents, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    # Written beside, then renamed: an interrupted run leaves no half-written file.
    with atomic_file(path) as tmp:
        save_file({"latents": latents.contiguous()}, str(tmp), metadata=metadata)


def _run_prompt(a: argparse.Namespace, engine, steps: int, overrides: dict, out: Path) -> None:
    """The whole FluxPipeline (text encoders, engine, VAE) from the folder the engine was built from."""
    import time

    import torch
    from PIL import Image

    from svdexport.runtime.pipeline import pipeline_for

    if len(a.prompt) > engine.shapes.batch:
        raise SvdExportError(f"{len(a.prompt)} prompts, but this engine was built for batch {engine.shapes.batch} "
                             f"(rebuild with --batch {len(a.prompt)})")
    pipe = pipeline_for(engine, **overrides)
    start = time.perf_counter()
    images = pipe(prompt=a.prompt, height=engine.shapes.height, width=engine.shapes.width, num_inference_steps=steps,
                  guidance_scale=a.guidance_scale, max_sequence_length=engine.shapes.text_len,
                  generator=torch.Generator().manual_seed(a.seed)).images
    seconds = time.perf_counter() - start
    strip = Image.new("RGB", (sum(i.width for i in images), images[0].height))
    for k, image in enumerate(images):
        strip.paste(image, (k * images[0].width, 0))
    with atomic_file(out) as tmp:
        strip.save(tmp, format="PNG")
    plan = pipe.transformer.plan_of_last_call()
    print(f"wrote {out} ({len(images)} image{'s' * (len(images) > 1)}, {engine.shapes.width}x{engine.shapes.height})")
    print(f"{steps} steps: {sum(plan)} full, {steps - sum(plan)} cached, {seconds:.2f} s with text encoders and VAE")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="svdexport", description="SVD-Cache DiT engines: build, calibrate, run.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="calibrate the bases and build an engine folder")
    _model_args(b)
    b.add_argument("--backend", default="eager", help=f"{' | '.join(BACKENDS)} (default eager)")
    b.add_argument("--out", help="engine folder (default engines/MODEL-BACKEND)")
    b.add_argument("--graphs", help="folder for the exported programs (default graphs/NAME of --out)")
    b.set_defaults(func=cmd_build)

    c = sub.add_parser("calibrate", help="only compute the low-rank bases (safetensors)")
    _model_args(c)
    c.add_argument("--out", required=True, help="bases file, .safetensors")
    c.set_defaults(func=cmd_calibrate)

    r = sub.add_parser("run", help="generate with an engine; writes the latents and a PNG preview")
    r.add_argument("engine", help="engine folder written by build")
    r.add_argument("--steps", type=int, help="sampling steps (default: the model's, FLUX.1-dev 50, schnell 4)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--prompt", action="append", help="text prompt, through the whole FluxPipeline of the engine's "
                   "weights folder; repeat for a batch (at most the engine's --batch)")
    r.add_argument("--guidance-scale", type=float, default=3.5, help="FLUX.1-dev's distilled guidance (default 3.5)")
    r.add_argument("--out", help="PNG path (default out/ENGINE-seedS.png); latents go beside as .safetensors")
    r.add_argument("--interval", type=int, help="override the engine's interval")
    r.add_argument("--warmup", type=int, help="override the engine's warmup")
    r.add_argument("--label", type=int, help="class to generate, for class-conditioned models (bundled digits)")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("compare", help="quality and speed against eager, every predictor and the peer libraries")
    c.add_argument("engine", help="engine folder written by build")
    c.add_argument("--samples", type=int, default=16)
    c.add_argument("--steps", type=int, default=50)
    c.add_argument("--intervals", default=None, help="comma list, e.g. 3,5,7,9 (default: the engine's)")
    c.add_argument("--peers", default="all", help="'all', 'none' or a comma list of peer names")
    c.add_argument("--json", help="write rows and settings as JSON")
    c.add_argument("--md", help="write the tables as markdown")
    c.add_argument("--grid", help="PNG of the reference and every method side by side")
    c.add_argument("--frontier", help="PNG of speed against PSNR across the intervals")
    c.add_argument("--temporal", help="videos: PNG of the PSNR between consecutive frames, per method")
    c.add_argument("--docs", help="write a generated benchmarks page (e.g. docs/benchmarks.md) with its plots")
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
    t.set_defaults(func=cmd_batch)
    m = sub.add_parser("bench", help="step and end-to-end latency against eager PyTorch, as ratios")
    m.add_argument("engine", help="engine folder written by build")
    m.add_argument("--steps", type=int, default=50)
    m.add_argument("--repeats", type=int, default=5, help="interleaved repeats of the step timings")
    m.add_argument("--step-calls", type=int, default=10, help="calls per step timing (default 10)")
    m.add_argument("--e2e-repeats", type=int, default=3, help="interleaved repeats of whole generations")
    m.add_argument("--json", help="also write the measurements to this JSON file")
    m.set_defaults(func=cmd_bench)
    return p


def cmd_compare(a: argparse.Namespace) -> None:
    from svdexport.bench import peers as peer_lib
    from svdexport.bench import report
    from svdexport.bench.compare import compare

    try:
        intervals = tuple(int(i) for i in a.intervals.split(",")) if a.intervals else None
    except ValueError:
        raise SvdExportError(f"--intervals must be a comma list of integers, got {a.intervals!r}") from None
    if intervals is not None and min(intervals) < 1 or a.samples < 1 or a.steps < 1:
        raise SvdExportError("--intervals, --samples and --steps must be >= 1")
    peers = {"all": None, "none": []}.get(a.peers)
    if peers is None and a.peers != "all":
        peers = a.peers.split(",")
        unknown = [p for p in peers if p not in peer_lib.PEERS]
        if unknown:
            raise SvdExportError(f"unknown peer {unknown[0]!r} (choose from {', '.join(peer_lib.PEERS)})")
    if intervals is None:
        import svdexport

        intervals = (svdexport.load(a.engine).cache.interval,)
    result = compare(a.engine, samples=a.samples, steps=a.steps, intervals=intervals, peers=peers)
    print(report.markdown(result))
    for path, text in ((a.json, report.to_json(result)), (a.md, report.markdown(result))):
        if path:
            with atomic_file(Path(path)) as tmp:
                tmp.write_text(text)
    if a.grid:
        report.grid(result, Path(a.grid), 7 if 7 in intervals else intervals[0])
    if a.frontier:
        report.frontier_plot(result, Path(a.frontier))
    if a.temporal:
        if not result["temporal"]:
            raise SvdExportError("--temporal is for video models; this engine makes images")
        report.temporal_plot(result, Path(a.temporal), 7 if 7 in intervals else intervals[0])
    if a.docs:
        report.write_docs(result, Path(a.docs), "svdexport " + " ".join(sys.argv[1:]))


def cmd_batch(a: argparse.Namespace) -> None:
    from svdexport.batch.runner import BatchOptions, run

    summary = run(BatchOptions(engine=a.engine, items=a.prompts, out=a.out, workers=a.workers, address=a.address,
                               seed=a.seed, steps=a.steps, guidance_scale=a.guidance_scale,
                               gpus_per_worker=a.gpus_per_worker))
    print(f"{a.out}: {summary.line()}")
    if summary.failed:
        first = next(iter(summary.failed.items()))
        raise SvdExportError(f"{len(summary.failed)} items failed (item {first[0]}: {first[1]}); rerun to retry "
                             f"them, the finished ones are kept (see {a.out}/summary.json)")


def cmd_bench(a: argparse.Namespace) -> None:
    import json

    from svdexport.bench.latency import bench, format_report

    if min(a.steps, a.repeats, a.e2e_repeats, a.step_calls) < 1:
        raise SvdExportError("--steps, --repeats, --step-calls and --e2e-repeats must be >= 1")
    report = bench(a.engine, steps=a.steps, repeats=a.repeats, step_calls=a.step_calls, e2e_repeats=a.e2e_repeats)
    print(format_report(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
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
    try:
        args.func(args)
    except SvdExportError as e:
        print(f"svdexport: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("svdexport: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
