"""Option groups of `build` and `calibrate`, each owned by the pipeline stage that uses it, and how their values
become BuildOptions:

- model: which transformer, in which dtype, on which device (build, calibrate);
- build shapes: the family's shape axes (`Family.shapes_type`) (build, calibrate);
- calibration: what the bases are computed from (build, calibrate; build --bases takes a calibrate file);
- forecast: the predictor, with its parameters (build): --predictor svd-taylor:order=2;
- plan: which steps run in full, and the plans fitted or refined at build (build);
- shape range: a ranged engine's smallest and largest shapes (build);
- backend: how the graphs become an engine folder (build).

`calibrate` has only the groups that change its output (the bases): model, build shapes, calibration.
"""

from __future__ import annotations

import argparse

from svdexport.cli.common import gone, int_list
from svdexport.cli.family_help import FamilyHelp, option
from svdexport.errors import SvdExportError

CALIBRATION = ("granularity", "tau", "k_max")  # what a bases file fixes (build --bases)
REMOVED_PARAMETERS = {  # build's flags of 0.4.0 that the predictor now carries
    "--beta": "is gone: the predictor carries its parameters, e.g. --predictor ema:beta=0.9",
    "--order": "is gone: the predictor carries its parameters, e.g. --predictor svd-taylor:order=2",
    "--gamma": "is gone: the predictor carries its parameters, e.g. --predictor svd-taylor:gamma=0",
}
BUILD_ONLY = ("--predictor", "--warmup", "--interval", "--plan", "--full-steps", "--plan-steps", "--refine-evaluations",
              "--refine-samples", "--refine-budgets", "--no-memory-check", "--backend", "--graphs", "--embed-weights",
              "--attention", "--quantize")


def add_model_group(p: argparse.ArgumentParser, h: FamilyHelp) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="flux", help=h.models)
    g.add_argument("--weights", help=h.weights)
    g.add_argument("--dtype", default="auto", help="fp32 | bf16 | fp16 | auto (default: bf16 on CUDA and on CPUs with "
                   "bf16 matrix units, fp32 elsewhere and for onnx on CPU; build prints why)")
    g.add_argument("--device", default="auto", help="cpu | cuda | auto (default: cuda when a GPU is visible)")


def add_shape_group(p: argparse.ArgumentParser, h: FamilyHelp) -> None:
    g = p.add_argument_group("build shapes (a static engine's only ones; a ranged engine's optimum)")
    for axis, (text, default, _) in h.axes.items():
        g.add_argument(option(axis), dest=axis, type=int, metavar="N", help=f"{text} (default: the model's: {default})")
    p.set_defaults(shape_axes=tuple(h.axes))


def add_calibration_group(p: argparse.ArgumentParser, h: FamilyHelp, stage: str) -> None:
    d = h.defaults
    g = p.add_argument_group("calibration (the bases: what `calibrate` writes, and build --bases takes back in)")
    if stage == "build":
        g.add_argument("--bases", metavar="FILE", help="the bases of a `svdexport calibrate` FILE instead of "
                       "calibrating them (their model, weights, granularity, tau and k_max must fit; the plan "
                       "statistics still come from the calibration inputs)")
    fixed = "; with --bases: the file's" if stage == "build" else ""
    g.add_argument("--granularity", help=f"block | final: where the cache sites are (default: {d.granularity}{fixed})")
    g.add_argument("--tau", type=float, help=f"energy kept by the principal subspace (default: {d.tau}{fixed})")
    g.add_argument("--k-max", type=int, help=f"rank cap per site, bases padded to it (default: {d.k_max}{fixed})")
    g.add_argument("--calib-samples", type=int, default=8, help="reference inputs (default: %(default)s)")
    g.add_argument("--calib-steps", type=int, help=f"sampling steps per input (default: the model's: {h.plan})")
    g.add_argument("--calib-shapes", metavar="HxW,...", help="also calibrate on inputs of these resolutions (the "
                   "inputs take turns with the build shapes; build: in the engine's range; default: the build shapes)")
    g.add_argument("--calibration-prompts", metavar="FILE",
                   help="prompts, one per line, for models with text encoders (default: a built-in list of 16)")
    if stage == "calibrate":  # the build's options change no bases: a one-line hint instead of argparse's
        gone(p, {o: "does not change the bases: it is a build option (build --bases FILE takes this file)"
                 for o in (*BUILD_ONLY, *REMOVED_PARAMETERS)})


def add_forecast_group(p: argparse.ArgumentParser, h: FamilyHelp) -> None:
    d = h.defaults
    g = p.add_argument_group("forecast (what cached steps predict the feature with)")
    g.add_argument("--predictor", metavar="NAME[:KEY=VALUE,...]", default=d.predictor,
                   help=f"{h.predictors}; parameters: order 1 or 2 (svd-taylor's finite differences, default "
                        f"{d.order}), beta (the EMA weight on the old value, default {d.beta}), gamma (the residual's "
                        f"damped Taylor step, 0 reuses it, default {d.gamma}); e.g. svd-taylor:order=2,gamma=0 "
                        "(default: %(default)s)")
    gone(p, REMOVED_PARAMETERS)


def add_plan_group(p: argparse.ArgumentParser, h: FamilyHelp) -> None:
    d = h.defaults
    g = p.add_argument_group("step plan (which steps run in full)")
    g.add_argument("--plan", default=d.plan_kind, help="calibrated | uniform (default: %(default)s, chosen on the "
                   "calibration inputs; uniform: warmup, then every interval)")
    g.add_argument("--full-steps", type=int, help="full steps of a calibrated plan (default: as many as warmup and "
                   "interval give, 9 of 50 for FLUX.1-dev)")
    g.add_argument("--warmup", type=int, help="first full steps (default: the model's, below)")
    g.add_argument("--interval", type=int, help=f"one full step every N after warmup (default: the model's: {h.plan})")
    g.add_argument("--plan-steps", metavar="N,...", help="also fit plans and forecast weights for requests of these "
                   "step counts, e.g. 28 (one more pass over the calibration inputs each; default: --calib-steps only)")
    g.add_argument("--refine-evaluations", type=int, default=0, help="closed-loop plan refinement: plans scored "
                   "per budget (e.g. 200); 0: off (default: %(default)s)")
    g.add_argument("--refine-samples", type=int, default=32, help="inputs it scores on (default: %(default)s)")
    g.add_argument("--refine-budgets", metavar="N,...", help="budgets it refines (default: b-2,b,b+3)")


def add_range_group(p: argparse.ArgumentParser, h: FamilyHelp) -> None:
    g = p.add_argument_group("shape range (a ranged engine; the build shapes above are the ones it is optimised "
                             "for; give none for a static engine)")
    for axis in h.ranged_axes:
        text = h.axes[axis][2] if axis in h.axes else axis
        g.add_argument(f"--max-{option(axis)[2:]}", dest=f"max_{axis}", type=int, metavar="N",
                       help=f"largest {text} served (default: the build's)")
        g.add_argument(f"--min-{option(axis)[2:]}", dest=f"min_{axis}", type=int, metavar="N",
                       help=f"smallest {text} served (default: 1, 16 px or 1 token when the axis ranges, else "
                            "the build's)")
    p.set_defaults(ranged_axes=h.ranged_axes)


def add_backend_group(p: argparse.ArgumentParser, h: FamilyHelp) -> None:
    g = p.add_argument_group("backend (how the graphs become an engine)")
    g.add_argument("--backend", default="eager", help=f"{h.backends} (default: %(default)s)")
    g.add_argument("--graphs", help="folder for the exported programs (default graphs/NAME of --out)")
    g.add_argument("--attention", default="dense", metavar="dense|sparse[:tile=AxB[xC],window=N|AxB[xC]]",
                   help="sparse: block-sparse tile-window attention through FlexAttention in the full-compute graph "
                   "(aoti, inductor or eager; static shapes), all text tokens kept; tile in tokens, window in tiles "
                   "per axis; defaults FLUX tile=8x16,window=1, HunyuanVideo tile=2x8x8,window=1 (frames x rows x "
                   "columns); pays from about 2.5-5k tokens on CPU; untuned it costs the digits models 11-25 dB: "
                   "check the quality on your model (docs/sparse.md) (default: %(default)s)")
    g.add_argument("--quantize", default="none", metavar="none|int8|fp8|auto",
                   help="quantized linears, aoti backend only: int8 on a CPU (PT2E + oneDNN: AMX-INT8 or VNNI; "
                   "calibrates in fp32; 1.5-1.7x the bf16 aoti full step at FLUX.1 width and 256x256, 0.6x at 1024x1024 where "
                   "fp32 attention dominates: docs/int8.md), fp8 on "
                   "CUDA GPUs of compute capability 8.9+ (torchao; int8 on older ones); auto: the best the device "
                   "has, else none. Needs torchao; a quantized engine takes no LoRA (default: %(default)s)")
    g.add_argument("--embed-weights", action="store_true", help="keep the weights inside the engine (a "
                   "self-contained engine to ship); default: an engine built from a local checkpoint references "
                   "its files by sha256 and maps them at load (bundled models are always kept inside)")
    g.add_argument("--no-memory-check", action="store_true",
                   help="build even when the estimated peak memory exceeds what is available")


def add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="show the exporters', optimizers' and compilers' own output and warnings (captured otherwise)")


# ------------------------------------------------------------------------------------------------ values


def parse_predictor(text: str) -> dict:
    """`NAME[:KEY=VALUE,...]` -> CacheConfig fields ({"predictor": NAME, KEY: value}), each key one the
    predictor takes (cache/predictors.PARAMETERS) and each value in range; else one line naming the option."""
    from svdexport.cache.config import CacheConfig
    from svdexport.cache.predictors import PARAMETERS

    name, colon, rest = text.partition(":")
    if name not in PARAMETERS:
        raise SvdExportError(f"--predictor: unknown predictor {name!r} (choose from {', '.join(PARAMETERS)})")
    keys, out = PARAMETERS[name], {"predictor": name}
    takes = f"{name} takes {', '.join(keys)}" if keys else f"{name} takes no parameters"
    for item in rest.split(",") if colon else []:
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or key not in keys or key in out:
            what = "twice" if key in out else f"{item!r}"
            raise SvdExportError(f"--predictor {text}: {takes} (NAME:KEY=VALUE,...), got {what}")
        try:
            out[key] = int(value) if key == "order" else float(value)
        except ValueError:
            raise SvdExportError(f"--predictor {text}: {key} must be a number, got {value!r}") from None
    try:
        CacheConfig(**out).validate()
    except SvdExportError as e:
        raise SvdExportError(f"--predictor {text}: {e}") from None
    return out


def _bases_settings(a: argparse.Namespace) -> dict:
    """granularity, tau and k_max: given, else the --bases file's, else the defaults."""
    from svdexport.builder import bases_file

    fixed = bases_file.defaults(a.bases) if getattr(a, "bases", None) else {}
    given = {k: getattr(a, k) if getattr(a, k) is not None else fixed.get(k) for k in CALIBRATION}
    return {k: v for k, v in given.items() if v is not None}


def build_options(a: argparse.Namespace, stage: str):
    """The BuildOptions of `build` (stage "build") or `calibrate` (stage "calibrate": the bases' options only)."""
    from svdexport import quiet
    from svdexport.builder.build import BuildOptions
    from svdexport.cache.config import CacheConfig
    from svdexport.models import family
    from svdexport.models.ranges import parse_sizes

    family(a.model)  # an unknown family fails here, before any work
    cache, plan, more = _bases_settings(a), {}, {}
    if stage == "build":
        cache.update(parse_predictor(a.predictor), warmup=a.warmup, interval=a.interval, plan_kind=a.plan,
                     full_steps=a.full_steps)
        plan = {"plan_steps": list(int_list(a.plan_steps, "--plan-steps")), "refine_evaluations": a.refine_evaluations,
                "refine_samples": a.refine_samples,
                "refine_budgets": list(int_list(a.refine_budgets, "--refine-budgets")) or None}
        more = {"backend": a.backend, "check_memory": not a.no_memory_check, "embed_weights": a.embed_weights,
                "bases": a.bases, "attention": a.attention, "quantize": a.quantize,
                **{f"{end}_shapes": {k: getattr(a, f"{end}_{k}") for k in a.ranged_axes} for end in ("min", "max")}}
    shapes = {k: getattr(a, k) for k in a.shape_axes if getattr(a, k) is not None}
    quiet.set_verbose(a.verbose)  # read by the backends' quiet() and inherited by subprocesses
    return BuildOptions(model=a.model, weights=a.weights, cache=CacheConfig(**cache), shapes=shapes,
                        calib_shapes=parse_sizes(a.calib_shapes, "--calib-shapes"), dtype=a.dtype, device=a.device,
                        calib_samples=a.calib_samples, calib_steps=a.calib_steps,
                        calibration_prompts=a.calibration_prompts, force=a.force, **plan, **more)
