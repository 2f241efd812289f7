"""Option groups that commands share, and how their values become build and run options: shapes and shape
ranges (issue 15), closed-loop plan refinement (issue 12), LoRA files (issue 15)."""

from __future__ import annotations

import argparse

from svdexport import quiet
from svdexport.cache.config import GRANULARITIES, CacheConfig
from svdexport.cache.predictors import PREDICTORS
from svdexport.errors import SvdExportError

DEFAULTS = CacheConfig()


def add_shape_args(p: argparse.ArgumentParser, command: str) -> None:
    """Issue 15's options: build's shape range, run's request shapes, bench's ranged measurements."""
    {"build": _add_range_args, "run": _add_request_shape_args, "bench": _add_shape_bench_args}[command](p)


def shapes_line(record) -> str:
    """'static, shapes {...}' or 'ranged, shapes {...}, range {...} .. {...}' of a manifest's shapes."""
    ranged = f", range {record.min} .. {record.max}" if record.max else ""
    return f"{record.kind.value}, shapes {record.build}{ranged}"


def _add_range_args(p: argparse.ArgumentParser) -> None:
    """build's --min-* / --max-*: one engine for a range of shapes (issue 15)."""
    g = p.add_argument_group("shape range (a ranged engine; the build shapes above are the ones it is optimised "
                             "for; give none for a static engine)")
    for axis, what in (("batch", "samples per call"), ("height", "pixels, a multiple of 16"),
                       ("width", "pixels, a multiple of 16"), ("text-len", "text tokens")):
        g.add_argument(f"--max-{axis}", type=int, metavar="N", help=f"largest {what} served (default: the build's)")
        g.add_argument(f"--min-{axis}", type=int, metavar="N", help=f"smallest {what} served (default: 1, 16 px or 1 "
                       "token when the axis ranges, else the build's)")
    g.add_argument("--calib-shapes", metavar="HxW,...", help="also calibrate the bases on inputs of these resolutions "
                   "(in range; the calibration inputs take turns with the build shapes; default: the build shapes only)")


def range_options(a: argparse.Namespace) -> dict[str, dict]:
    """BuildOptions' min_shapes and max_shapes (--min-* / --max-* values by shape axis, None: not given) and
    calib_shapes (calibrate has none of these options)."""
    from svdexport.models.ranges import parse_sizes

    axes = ("batch", "height", "width", "text_len")
    out = {f"{end}_shapes": {k: getattr(a, f"{end}_{k}", None) for k in axes} for end in ("min", "max")}
    return {**out, "calib_shapes": parse_sizes(getattr(a, "calib_shapes", None), "--calib-shapes")}


def _add_request_shape_args(p: argparse.ArgumentParser) -> None:
    """run's shape of one request: any shape in a ranged engine's range (default: the build shapes)."""
    g = p.add_argument_group("request shapes (a ranged engine takes any in its range; default: the build shapes)")
    g.add_argument("--batch", type=int, help="samples in this request")
    g.add_argument("--height", type=int, help="pixels, a multiple of 16")
    g.add_argument("--width", type=int, help="pixels, a multiple of 16")


def _add_shape_bench_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("shape ranges (issue 15; either option runs these measurements instead)")
    g.add_argument("--against", metavar="STATIC", help="a static engine of ENGINE's optimal shape: full step, cached "
                   "step and generation of the ranged ENGINE against it, side by side")
    g.add_argument("--resolutions", metavar="HxW,...", help="latency of the ranged ENGINE per resolution, e.g. "
                   "96x96,128x128,160x160")


def int_list(text: str | None, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(i) for i in text.split(",")) if text else ()
    except ValueError:
        raise SvdExportError(f"{option} must be a comma list of integers, got {text!r}") from None


def plan_args(k) -> None:
    """build's step plan options: other step counts to plan for, and closed-loop plan refinement (opt-in:
    README, "Step plans")."""
    k.add_argument("--plan-steps", metavar="N,...", help="also fit plans and forecast weights for requests of these "
                   "step counts, e.g. 28 (one more pass over the calibration inputs each; default: --calib-steps only)")
    k.add_argument("--refine-evaluations", type=int, default=0, help="closed-loop plan refinement: plans scored "
                   "per budget (e.g. 200); 0: off (default: %(default)s)")
    k.add_argument("--refine-samples", type=int, default=32, help="inputs it scores on (default: %(default)s)")
    k.add_argument("--refine-budgets", help="budgets it refines, a comma list (default: b-2,b,b+3)")


def plan_options(a: argparse.Namespace) -> dict:
    return {"plan_steps": list(int_list(a.plan_steps, "--plan-steps")),
            "refine_evaluations": a.refine_evaluations, "refine_samples": a.refine_samples,
            "refine_budgets": list(int_list(a.refine_budgets, "--refine-budgets")) or None}


def lora_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="LoRA .safetensors (diffusers, Kohya or "
                   "BFL names) fused into the engine's weights without a rebuild (SCALE default 1); repeatable")


def model_args(p: argparse.ArgumentParser) -> None:
    """The model, shape, SVD-Cache and calibration options of build and calibrate."""
    from svdexport.commands import add_force, model_help

    h = model_help()
    g = p.add_argument_group("model")
    g.add_argument("--model", default="flux", help=h["model"])
    g.add_argument("--weights", help=h["weights"])
    g.add_argument("--dtype", default="auto", help="fp32 | bf16 | fp16 | auto (default: bf16 on CUDA and on CPUs with bf16 "
                   "matrix units, fp32 elsewhere and for onnx on CPU; build prints why)")
    g.add_argument("--device", default="auto", help="cpu | cuda | auto (default: cuda when a GPU is visible)")
    s = p.add_argument_group("build shapes (a static engine's only ones; a ranged engine's optimum)")
    s.add_argument("--batch", type=int, help=h["batch"])
    s.add_argument("--height", type=int, help=h["height"])
    s.add_argument("--width", type=int, help=h["width"])
    s.add_argument("--text-len", type=int, help=h["text_len"])
    s.add_argument("--frames", type=int, help=h["frames"])
    c = p.add_argument_group("SVD-Cache")
    c.add_argument("--granularity", default=DEFAULTS.granularity,
                   help=f"{' | '.join(GRANULARITIES)} (default: {DEFAULTS.granularity})")
    c.add_argument("--predictor", default=DEFAULTS.predictor, help=f"{' | '.join(PREDICTORS)} (default: %(default)s)")
    c.add_argument("--beta", type=float, default=DEFAULTS.beta, help="EMA weight on the old value (default: %(default)s)")
    c.add_argument("--order", type=int, default=DEFAULTS.order, help="svd-taylor order, 1 or 2 (default: %(default)s)")
    c.add_argument("--tau", type=float, default=DEFAULTS.tau,
                   help="energy kept by the principal subspace (default: %(default)s)")
    c.add_argument("--k-max", type=int, default=DEFAULTS.k_max,
                   help="rank cap per site, bases padded to it (default: %(default)s)")
    c.add_argument("--warmup", type=int, help="first full steps (default: the model's, below)")
    c.add_argument("--interval", type=int, help=f"one full step every N after warmup (default: the model's: {h['plan']})")
    c.add_argument("--plan", default=DEFAULTS.plan, help="calibrated | uniform: which steps run in full "
                   f"(default: {DEFAULTS.plan}, chosen on the calibration inputs; uniform: warmup, then every interval)")
    c.add_argument("--full-steps", type=int, help="full steps of a calibrated plan (default: as many as warmup and "
                   "interval give, 9 of 50 for FLUX.1-dev)")
    c.add_argument("--gamma", type=float, default=DEFAULTS.gamma, help="residual forecast: damped Taylor step of the "
                   "residual, 0 = reuse it (default: %(default)s)")
    k = p.add_argument_group("calibration")
    k.add_argument("--calib-samples", type=int, default=8, help="reference inputs (default: %(default)s)")
    k.add_argument("--calib-steps", type=int, help="sampling steps per input (default: the model's steps, as for "
                   "--interval)")
    plan_args(k)
    k.add_argument("--calibration-prompts", metavar="FILE",
                   help="prompts, one per line, for models with text encoders (default: a built-in list of 16)")
    k.add_argument("--no-memory-check", action="store_true",
                   help="build even when the estimated peak memory exceeds what is available")
    k.add_argument("--verbose", action="store_true",
                   help="show the exporters', optimizers' and compilers' own output and warnings (captured otherwise)")
    add_force(p, "outputs")


def build_options(a: argparse.Namespace, backend: str = "eager"):
    from svdexport.models import family
    from svdexport.builder.build import BuildOptions

    family(a.model)  # an unknown family fails here, before any work
    cache = CacheConfig(granularity=a.granularity, predictor=a.predictor, beta=a.beta, order=a.order, tau=a.tau,
                        k_max=a.k_max, warmup=a.warmup, interval=a.interval, plan=a.plan, full_steps=a.full_steps,
                        gamma=a.gamma)
    shapes = {k: v for k, v in (("batch", a.batch), ("height", a.height), ("width", a.width),
                                ("text_len", a.text_len), ("frames", a.frames)) if v is not None}
    quiet.set_verbose(a.verbose)  # read by the backends' quiet() and inherited by subprocesses
    return BuildOptions(model=a.model, weights=a.weights, backend=backend, cache=cache, shapes=shapes,
                        **range_options(a),
                        dtype=a.dtype, device=a.device, calib_samples=a.calib_samples, calib_steps=a.calib_steps,
                        calibration_prompts=a.calibration_prompts, check_memory=not a.no_memory_check, force=a.force,
                        embed_weights=getattr(a, "embed_weights", False),
                        **plan_options(a))
