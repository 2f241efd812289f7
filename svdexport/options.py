"""Option groups that commands share, and how their values become build and run options: shapes and shape
ranges (issue 15), closed-loop plan refinement (issue 12), LoRA files (issue 15)."""

from __future__ import annotations

import argparse

from svdexport.errors import SvdExportError


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
