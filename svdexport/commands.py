"""What every command shares before its work (one-line argparse errors, trust options, the help's defaults)
and the commands that write files beside an engine: `run`, `keygen`, `sign`; `bench --lora` and the ranged benches."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable

from svdexport.errors import SvdExportError
from svdexport.outputs import check_files


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as the one line `svdexport: error: ...` (exit 2) every other error has,
    instead of the usage block. Subcommand parsers inherit it (add_subparsers uses this class)."""

    def error(self, message: str):
        sub = self.prog.removeprefix("svdexport").strip()
        self.exit(2, f"svdexport: error: {sub + ': ' if sub else ''}{message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------------------------ --help


def model_help() -> dict[str, str]:
    """Help texts that name the real defaults and valid names, read from the registries."""
    from svdexport.cache.predictors import PREDICTORS
    from svdexport.export import BACKENDS
    from svdexport.models import FAMILIES

    shapes, bundled, plans = {}, [], []
    for name, fam in FAMILIES.items():
        info = fam.inspect(None)
        s = fam.default_shapes(info).to_dict()
        shapes[name] = (fam.default_weights, s)
        bundled.append(f"{name}: " + ", ".join(f"bundled:{b}" for b in fam.bundled))
        run = fam.run_defaults(info.config, fam.sampler_config(None, info.config))
        plans.append(f"{name} ({fam.default_weights}) {run.steps} steps, warmup {run.warmup}, interval {run.interval}")

    def default(axis: str) -> str:
        found = [f"{n} ({w}) {s[axis]}" for n, (w, s) in shapes.items() if axis in s]
        return "; ".join(found)

    return {
        "model": f"DiT family: {' | '.join(FAMILIES)} (default: flux)",
        "weights": "a local diffusers folder, a transformer .safetensors, or a bundled model ("
                   + "; ".join(bundled) + f"; default: {'; '.join(f'{n} {w}' for n, (w, _) in shapes.items())})",
        "batch": f"samples per call (default: {default('batch')})",
        "height": f"height in pixels (default: the model's: {default('height')}; FLUX.1 folders 1024)",
        "width": f"width in pixels (default: the model's: {default('width')}; FLUX.1 folders 1024)",
        "text_len": f"text tokens (default: the model's: {default('text_len')}; FLUX.1-dev 512, schnell 256)",
        "frames": f"video frames, 4k + 1, video models only (default: {default('frames')})",
        "plan": "; ".join(plans) + "; FLUX.1-dev 50, 3, 7; schnell 4, 1, 2",
        "backends": " | ".join(BACKENDS),
        "predictors": " | ".join(PREDICTORS),
    }


# ------------------------------------------------------------------------------------------------ shapes


def cmd_bench_shapes(a: argparse.Namespace) -> None:
    """`bench ENGINE --against STATIC --resolutions ...`: every option checked before the work."""
    from svdexport.bench.shapes import bench_shapes, format_shapes_report, parse_resolutions
    from svdexport.media import json_text, write_text
    from svdexport.models import family
    from svdexport.runtime import manifest as manifest_io

    resolutions = parse_resolutions(a.resolutions)
    peek = manifest_io.read(Path(a.engine), check_versions=False, hash_files=False)
    if peek.shapes.kind is not manifest_io.EngineKind.RANGED:
        raise SvdExportError(f"{a.engine} is a static engine: --against and --resolutions measure a ranged one")
    served = peek.shapes.range(family(peek.model.family))
    for h, w in resolutions:
        served.request(height=h, width=w)
    if a.against:
        manifest_io.read(Path(a.against), check_versions=False, hash_files=False)
    check_files([("--json", a.json)], a.force)
    report = bench_shapes(a.engine, a.against, resolutions, steps=a.steps, repeats=a.repeats,
                          step_calls=a.step_calls, e2e_repeats=a.e2e_repeats)
    print(format_shapes_report(report))
    if a.json:
        write_text(json_text(report), Path(a.json))


# ------------------------------------------------------------------------------------------------ trust


def add_trust_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("trust (engines are code: see the README's Security section)")
    g.add_argument("--require-signature", action="store_true",
                   help="refuse an engine that is not signed by a trusted key (svdexport sign)")
    g.add_argument("--trusted-key", action="append", metavar="PUB", default=None,
                   help="public key file (svdexport keygen's KEY.pub) whose signatures are trusted; repeatable; "
                        "implies --require-signature (default: the SVDEXPORT_TRUSTED_KEYS environment variable)")


def apply_trust_args(a: argparse.Namespace) -> list[Path]:
    """The keys to trust for this command, checked before any work. They go into SVDEXPORT_TRUSTED_KEYS, so
    that every load in this process and in the workers it starts (batch) requires the signature."""
    from svdexport.runtime import trust

    keys = trust.trusted_keys(a.trusted_key)
    if a.require_signature and not keys:
        raise SvdExportError(f"--require-signature needs --trusted-key PUB or {trust.ENV}")
    for k in keys:
        trust.load_public(k)
    if keys:
        os.environ[trust.ENV] = os.pathsep.join(str(Path(k).resolve()) for k in keys)
    return keys


def cmd_keygen(a: argparse.Namespace) -> None:
    from svdexport.runtime import trust

    private, public = trust.keygen(Path(a.out), force=a.force)
    print(f"wrote {private} (private key, keep it secret) and {public} (public key, for --trusted-key)")


def cmd_sign(a: argparse.Namespace) -> None:
    from svdexport.runtime import manifest, trust

    # Never sign an engine whose files fail their hashes; signing needs no earlier signature.
    manifest.read(Path(a.engine), check_versions=False, signature=False).opened.close()
    record = trust.sign(Path(a.engine), Path(a.key))
    print(f"signed {a.engine} with key {record['key_id']} ({trust.SIGNATURE}, manifest sha256 "
          f"{record['manifest_sha256'][:16]}...)")


# ------------------------------------------------------------------------------------------------ run


def run_outputs(a: argparse.Namespace, is_video: bool, batch: int) -> dict[str, list[Path] | Path | None]:
    """Every file `run` will write, checked before the work: the image (.png) or the video (.gif, .mp4; one
    per sample), the frame grid of a video (.png) and the final latents (.safetensors), side by side."""
    default = ".gif" if is_video else ".png"
    out = Path(a.out or f"out/{Path(a.engine).name}-seed{a.seed}{default}")
    allowed = (".gif", ".mp4") if is_video else (".png",)
    if out.suffix.lower() not in allowed:
        kind = "a video engine" if is_video else "an image engine"
        raise SvdExportError(f"--out must end in {' or '.join(allowed)} for {kind}, got {out}")
    videos = [out if k == 0 else out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(batch)] if is_video else []
    plan = {"image": None if is_video else out, "videos": videos, "grid": out.with_suffix(".png") if is_video else None,
            "latents": None if a.prompt else out.with_suffix(".safetensors")}  # --prompt: decoded pixels only
    named = [("--out", out)] if not is_video else [("--out" if k == 0 else f"--out (video {k})", v)
                                                   for k, v in enumerate(videos)]
    named += [(what, plan[key]) for what, key in (("frame grid", "grid"), ("latents", "latents")) if plan[key]]
    check_files(named, a.force)
    return plan


def write_run(engine, result, plan: dict, metadata: dict[str, str]) -> list[str]:
    """Writes what `run_outputs` planned; returns one line per file."""
    from svdexport.media import write_gif, write_latents, write_mp4, write_png

    lines = []
    write_latents(result.latents, plan["latents"], metadata)
    preview = engine.preview(result.latents, result.shapes)
    if plan["image"] is not None:
        write_png(preview, plan["image"])
        what = "image" if engine.labels else "preview of the latents"  # the digits model's latents are pixels
        lines.append(f"wrote {plan['image']} ({what}) and {plan['latents']} (final latents)")
        return lines
    for path, frames in zip(plan["videos"], engine.family.video_frames(result.latents, result.shapes or engine.shapes)):
        (write_mp4 if path.suffix.lower() == ".mp4" else write_gif)(frames, path)
        lines.append(f"wrote {path} (video, {len(frames)} latent frames)")
    write_png(preview, plan["grid"])
    lines.append(f"wrote {plan['grid']} (frame grid of the latents) and {plan['latents']} (final latents)")
    return lines


def cmd_run(a: argparse.Namespace) -> None:
    import svdexport
    from svdexport.models import family
    from svdexport.runtime import manifest as manifest_io
    from svdexport.runtime.manifest import ConditioningKind

    if a.steps is not None and a.steps < 1:
        raise SvdExportError(f"--steps must be >= 1, got {a.steps}")
    apply_trust_args(a)
    if a.prompt and a.label is not None:
        raise SvdExportError("--label is for class-conditioned models; --prompt for text-conditioned ones")
    peek = manifest_io.read(Path(a.engine), check_versions=False, hash_files=False)  # the options' checks only
    loras = check_loras(a.lora or [], peek.backend, family(peek.model.family), options=peek.backend_options)
    fam = family(peek.model.family)
    shapes = peek.shapes.range(fam).request(batch=a.batch, height=a.height, width=a.width)  # in range, or one line
    plan = run_outputs(a, fam.is_video, shapes.batch)
    engine = svdexport.load(a.engine, weights=a.weights)  # verifies everything (and the signature, when required)
    if loras:
        start = time.perf_counter()
        engine.set_loras(loras)
        print(f"LoRA {', '.join(map(str, loras))}: {engine.lora_weights()} weights replaced in the compiled "
              f"graphs in {time.perf_counter() - start:.1f} s (no rebuild)")
    steps = a.steps or engine.steps
    overrides = {k: v for k, v in (("interval", a.interval), ("warmup", a.warmup), ("plan", a.plan),
                                   ("full_steps", a.full_steps)) if v is not None}
    # A bad override fails here, before the sampling; the plan is shown before the work.
    print(engine.plan(steps, engine.cache_config(**overrides)).describe())
    if a.prompt:
        _run_prompt(a, engine, steps, overrides, plan, shapes)
        return
    if engine.conditioning is ConditioningKind.PIPELINE:
        raise SvdExportError("this engine's model has text encoders: give --prompt \"...\"")
    labels = None if a.label is None else [a.label] * shapes.batch
    result = engine.generate(seed=a.seed, steps=steps, progress=True, labels=labels, batch=shapes.batch,
                             height=shapes.height, width=shapes.width, **overrides)
    metadata = {"seed": str(a.seed), "steps": str(steps), "engine": str(a.engine), "engine_build_key": peek.build_key}
    for line in write_run(engine, result, plan, metadata):
        print(line)
    print(f"{steps} steps: {result.full_steps} full, {result.cached_steps} cached, {result.seconds:.2f} s")
    engine.close()


def _run_prompt(a: argparse.Namespace, engine, steps: int, overrides: dict, plan: dict, shapes) -> None:
    """The family's whole pipeline (text encoders, engine, VAE) from the folder the engine was built from:
    images side by side in one PNG, or one video per prompt with a frame grid of them all."""
    from PIL import Image

    from svdexport.media import write_gif, write_mp4, write_png
    from svdexport.models.preview import frame_grid
    from svdexport.runtime.pipeline import run_prompts

    run = run_prompts(engine, a.prompt, steps, a.seed, a.guidance_scale, shapes=shapes, **overrides)
    if engine.family.is_video:
        for path, frames in zip(plan["videos"], run.samples):
            (write_mp4 if path.suffix.lower() == ".mp4" else write_gif)(frames, path)
            print(f"wrote {path} (video, {len(frames)} frames of {shapes.width}x{shapes.height})")
        write_png(frame_grid(run.samples), plan["grid"])
        print(f"wrote {plan['grid']} (frame grid: {len(run.samples)} x {len(run.samples[0])} frames)")
    else:
        images = run.samples
        strip = Image.new("RGB", (sum(i.width for i in images), images[0].height))
        for k, image in enumerate(images):
            strip.paste(image, (k * images[0].width, 0))
        write_png(strip, plan["image"])
        print(f"wrote {plan['image']} ({len(images)} image{'s' * (len(images) > 1)}, {shapes.width}x{shapes.height})")
    full = sum(run.plan)
    print(f"{steps} steps: {full} full, {steps - full} cached, {run.seconds:.2f} s with text encoders and VAE")
    engine.close()


def check_loras(specs: list[str], backend_name: str, fam, no_rebuild: bool = False,
                options: dict | None = None) -> list:
    """`--lora FILE[:SCALE]` options, checked before any work: each file a readable LoRA, a number for
    SCALE, an engine that can take new weights (its backend, and `options`, its manifest's backend_options)
    and a family with a LoRA loader."""
    from svdexport.export import backend
    from svdexport.models.lora import LoraFile

    if no_rebuild and not specs:
        raise SvdExportError("--no-rebuild is for --lora")
    if not specs:
        return []
    be = backend(backend_name)
    if (refusal := be.weights_refusal(options or {})) is not None:
        raise SvdExportError(f"--lora: backend {backend_name!r} cannot load a LoRA into a built engine: {refusal}")
    if fam.lora_loader is None:
        raise SvdExportError(f"--lora: LoRAs are not supported for {fam.name} models (no diffusers LoRA loader)")
    return [LoraFile.parse(s) for s in specs]


def bench_with_lora(p: argparse.ArgumentParser, bench: Callable) -> Callable:
    """Adds bench's --lora and --no-rebuild; returns the command: `cmd_bench_lora` when they are given, else `bench`."""
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="instead: seconds to load these LoRAs "
                   "into the engine against a rebuild of it, in the same run (repeatable)")
    p.add_argument("--no-rebuild", action="store_true", help="with --lora: time only the LoRA load and unload")
    return lambda a: cmd_bench_lora(a) if a.lora or a.no_rebuild else bench(a)


def cmd_bench_lora(a: argparse.Namespace) -> None:
    """`bench --lora`: LoRA load and unload against a rebuild of the engine (bench/lora.py)."""
    from svdexport.bench.lora import bench_lora, format_lora_report
    from svdexport.media import json_text, write_text
    from svdexport.models import family
    from svdexport.runtime import manifest as manifest_io

    if a.repeats < 1:
        raise SvdExportError("--repeats must be >= 1")
    apply_trust_args(a)
    peek = manifest_io.read(Path(a.engine), check_versions=False, hash_files=False)  # a missing engine fails first
    loras = check_loras(a.lora or [], peek.backend, family(peek.model.family), a.no_rebuild, peek.backend_options)
    check_files([("--json", a.json)], a.force)
    report = bench_lora(a.engine, loras, repeats=a.repeats, rebuild=not a.no_rebuild)
    print(format_lora_report(report))
    if a.json:
        write_text(json_text(report), Path(a.json))


def add_force(p: argparse.ArgumentParser, what: str = "output files") -> None:
    p.add_argument("--force", action="store_true", help=f"replace existing {what} that svdexport did not write")

