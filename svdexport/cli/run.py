"""`svdexport run ENGINE`: one generation with an engine; writes the image or video, and the latents beside it."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

from svdexport.cli.common import add_engine, add_force, add_trust_args, apply_trust_args, check_outputs, peek
from svdexport.errors import SvdExportError


def add_lora(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="LoRA .safetensors (diffusers, Kohya or "
                   "BFL names) fused into the engine's weights without a rebuild (SCALE default 1); repeatable")


def add_run(p: argparse.ArgumentParser) -> None:
    add_engine(p)
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's, FLUX.1-dev 50, schnell 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", action="append", help="text prompt, through the whole pipeline (FluxPipeline, "
                   "HunyuanVideoPipeline) of the engine's weights folder; repeat for a batch (at most the engine's "
                   "--batch)")
    p.add_argument("--guidance-scale", type=float, help="embedded guidance (default: the model's; FLUX.1-dev 3.5, "
                   "HunyuanVideo 6.0)")
    p.add_argument("--label", type=int, help="class to generate, for class-conditioned models (bundled digits)")
    p.add_argument("--out", help="image .png, or video .gif / .mp4 for video models (default out/ENGINE-seedS.png or "
                   ".gif); the latents go beside as .safetensors, a video's frame grid as .png")
    p.add_argument("--weights", metavar="PATH", help="where the checkpoint the engine references is now, if it moved "
                   "(a .safetensors file or a folder; matched to the recorded files by size and sha256)")
    g = p.add_argument_group("step plan (default: the engine's)")
    g.add_argument("--plan", help="calibrated | uniform (--interval/--warmup imply uniform)")
    g.add_argument("--full-steps", type=int, help="full steps of the calibrated plan")
    g.add_argument("--interval", type=int, help="one full step every N after warmup")
    g.add_argument("--warmup", type=int, help="first full steps")
    s = p.add_argument_group("request shapes (a ranged engine takes any in its range; default: the build shapes)")
    s.add_argument("--batch", type=int, help="samples in this request")
    s.add_argument("--height", type=int, help="pixels, a multiple of 16")
    s.add_argument("--width", type=int, help="pixels, a multiple of 16")
    add_force(p)
    add_trust_args(p)
    add_lora(p)
    p.set_defaults(func=cmd_run)


@dataclass
class RunOutputs:
    """Every file `run` writes, checked before the work: the image (.png) or the videos (.gif, .mp4; one per
    sample), a video's frame grid (.png) and the final latents (.safetensors), side by side."""

    image: Path | None = None
    videos: list[Path] = field(default_factory=list)
    grid: Path | None = None
    latents: Path | None = None  # none with --prompt: decoded pixels only


def run_outputs(a: argparse.Namespace, is_video: bool, batch: int) -> RunOutputs:
    default = ".gif" if is_video else ".png"
    out = Path(a.out or f"out/{Path(a.engine).name}-seed{a.seed}{default}")
    allowed = (".gif", ".mp4") if is_video else (".png",)
    if out.suffix.lower() not in allowed:
        kind = "a video engine" if is_video else "an image engine"
        raise SvdExportError(f"--out must end in {' or '.join(allowed)} for {kind}, got {out}")
    videos = [out if k == 0 else out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(batch)] if is_video else []
    outputs = RunOutputs(image=None if is_video else out, videos=videos,
                         grid=out.with_suffix(".png") if is_video else None,
                         latents=None if a.prompt else out.with_suffix(".safetensors"))
    named = [("--out", out)] if not is_video else [("--out" if k == 0 else f"--out (video {k})", v)
                                                   for k, v in enumerate(videos)]
    named += [(what, path) for what, path in (("frame grid", outputs.grid), ("latents", outputs.latents)) if path]
    check_outputs(named, a.force)
    return outputs


def write_run(engine, result, outputs: RunOutputs, metadata: dict[str, str]) -> list[str]:
    """Writes what `run_outputs` planned; returns one line per file."""
    from svdexport.media import write_gif, write_latents, write_mp4, write_png

    write_latents(result.latents, outputs.latents, metadata)
    preview = engine.preview(result.latents, result.shapes)
    if outputs.image is not None:
        write_png(preview, outputs.image)
        what = "image" if engine.labels else "preview of the latents"  # the digits model's latents are pixels
        return [f"wrote {outputs.image} ({what}) and {outputs.latents} (final latents)"]
    lines = []
    for path, frames in zip(outputs.videos, engine.family.video_frames(result.latents, result.shapes or engine.shapes)):
        (write_mp4 if path.suffix.lower() == ".mp4" else write_gif)(frames, path)
        lines.append(f"wrote {path} (video, {len(frames)} latent frames)")
    write_png(preview, outputs.grid)
    lines.append(f"wrote {outputs.grid} (frame grid of the latents) and {outputs.latents} (final latents)")
    return lines


def cmd_run(a: argparse.Namespace) -> None:
    import svdexport
    from svdexport.models import family
    from svdexport.runtime.loras import check_lora_options
    from svdexport.runtime.manifest import ConditioningKind

    if a.steps is not None and a.steps < 1:
        raise SvdExportError(f"--steps must be >= 1, got {a.steps}")
    apply_trust_args(a)
    if a.prompt and a.label is not None:
        raise SvdExportError("--label is for class-conditioned models; --prompt for text-conditioned ones")
    manifest = peek(a.engine)
    fam = family(manifest.model.family)
    loras = check_lora_options(a.lora or [], manifest.backend, fam, options=manifest.backend_options)
    shapes = manifest.shapes.range(fam).request(batch=a.batch, height=a.height, width=a.width)  # in range, or one line
    outputs = run_outputs(a, fam.is_video, shapes.batch)
    engine = svdexport.load(a.engine, weights=a.weights)  # verifies everything (and the signature, when required)
    if loras:
        start = time.perf_counter()
        engine.lora.set(loras)
        print(f"LoRA {', '.join(map(str, loras))}: {engine.lora.count()} weights replaced in the compiled "
              f"graphs in {time.perf_counter() - start:.1f} s (no rebuild)")
    steps = a.steps or engine.steps
    overrides = {k: v for k, v in (("interval", a.interval), ("warmup", a.warmup), ("plan_kind", a.plan),
                                   ("full_steps", a.full_steps)) if v is not None}
    # A bad override fails here, before the sampling; the plan is shown before the work.
    print(engine.plan(steps, engine.cache_config(**overrides)).describe())
    if a.prompt:
        _run_prompt(a, engine, steps, overrides, outputs, shapes)
        return
    if engine.conditioning is ConditioningKind.PIPELINE:
        raise SvdExportError("this engine's model has text encoders: give --prompt \"...\"")
    labels = None if a.label is None else [a.label] * shapes.batch
    result = engine.generate(seed=a.seed, steps=steps, progress=True, labels=labels, batch=shapes.batch,
                             height=shapes.height, width=shapes.width, **overrides)
    metadata = {"seed": str(a.seed), "steps": str(steps), "engine": str(a.engine),
                "engine_build_key": manifest.build_key}
    for line in write_run(engine, result, outputs, metadata):
        print(line)
    print(f"{steps} steps: {result.full_steps} full, {result.cached_steps} cached, {result.seconds:.2f} s")
    engine.close()


def _run_prompt(a: argparse.Namespace, engine, steps: int, overrides: dict, outputs: RunOutputs, shapes) -> None:
    """The family's whole pipeline (text encoders, engine, VAE) from the folder the engine was built from:
    images side by side in one PNG, or one video per prompt with a frame grid of them all."""
    from PIL import Image

    from svdexport.media import write_gif, write_mp4, write_png
    from svdexport.models.preview import frame_grid
    from svdexport.runtime.pipeline import run_prompts

    run = run_prompts(engine, a.prompt, steps, a.seed, a.guidance_scale, shapes=shapes, **overrides)
    if engine.family.is_video:
        for path, frames in zip(outputs.videos, run.samples):
            (write_mp4 if path.suffix.lower() == ".mp4" else write_gif)(frames, path)
            print(f"wrote {path} (video, {len(frames)} frames of {shapes.width}x{shapes.height})")
        write_png(frame_grid(run.samples), outputs.grid)
        print(f"wrote {outputs.grid} (frame grid: {len(run.samples)} x {len(run.samples[0])} frames)")
    else:
        images = run.samples
        strip = Image.new("RGB", (sum(i.width for i in images), images[0].height))
        for k, image in enumerate(images):
            strip.paste(image, (k * images[0].width, 0))
        write_png(strip, outputs.image)
        print(f"wrote {outputs.image} ({len(images)} image{'s' * (len(images) > 1)}, {shapes.width}x{shapes.height})")
    full = sum(run.plan)
    print(f"{steps} steps: {full} full, {steps - full} cached, {run.seconds:.2f} s with text encoders and VAE")
    engine.close()
