"""Help texts that name the real defaults and valid names, read from the registries: the families (their
shape axes from `Family.shapes_type`, with the help text each axis declares), the backends, the predictors
and their parameters. Imported only to build the parser of a subcommand that shows them (build, calibrate):
it imports torch and the families, which `svdexport --help`, keygen and sign never do.

A family added to the registry shows up here, with its shape axes, without a change to the CLI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache


@dataclass
class FamilyHelp:
    models: str = ""
    weights: str = ""
    plan: str = ""  # each family's default steps, warmup and interval
    backends: str = ""
    predictors: str = ""  # NAME (its parameters) | ...
    defaults: object = None  # CacheConfig(): the cache settings' defaults
    # Shape axis -> (help, default text, short help), in declaration order over every family's shapes (--text-len:
    # text_len); the short help is the first family's words alone.
    axes: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    ranged_axes: tuple[str, ...] = ()  # the axes a ranged engine can range over (--min-* / --max-*)


def shape_axes(shapes_type) -> dict[str, str]:
    """Axis name -> help text of a family's shapes dataclass (the field's `help` metadata, or its name)."""
    if hasattr(shapes_type, "axes"):
        return shapes_type.axes()
    return {f.name: f.metadata.get("help", f.name.replace("_", " ")) for f in dataclasses.fields(shapes_type)}


def option(axis: str) -> str:
    return "--" + axis.replace("_", "-")


@lru_cache(maxsize=1)
def family_help() -> FamilyHelp:
    from svdexport.cache.config import CacheConfig
    from svdexport.cache.predictors import PARAMETERS, PREDICTORS
    from svdexport.export import BACKENDS
    from svdexport.models import FAMILIES
    from svdexport.models.ranges import RANGED_AXES

    weights, bundled, plans, defaults, helps = [], [], [], {}, {}
    for name, fam in FAMILIES.items():
        info = fam.inspect(None)  # the family's default (bundled) weights: a config, no tensor loaded
        defaults[name] = (fam.default_weights, fam.default_shapes(info).to_dict())
        weights.append(f"{name} {fam.default_weights}")
        bundled.append(f"{name}: " + ", ".join(f"bundled:{b}" for b in fam.bundled))
        run = fam.run_defaults(info.config, fam.sampler_config(None, info.config))
        plans.append(f"{name} ({fam.default_weights}) {run.steps} steps, warmup {run.warmup}, interval {run.interval}")
        for axis, text in shape_axes(fam.shapes_type).items():
            helps.setdefault(axis, {}).setdefault(text, []).append(name)

    def words(texts: dict[str, list[str]]) -> str:
        """The first family's help text, and the others' where they say something else."""
        first, *others = texts
        said = "; ".join(", ".join(texts[t]) + f": {t}" for t in others)
        return first + (f" ({said})" if others else "")

    def default(axis: str) -> str:
        found = [f"{n} ({w}) {s[axis]}" for n, (w, s) in defaults.items() if axis in s]
        having = [n for n, (_, s) in defaults.items() if axis in s]
        only = "" if len(having) == len(defaults) else f"; {', '.join(having)} only"
        return "; ".join(found) + only

    predictors = " | ".join(f"{n} ({', '.join(PARAMETERS.get(n, ())) or 'no parameters'})" for n in PREDICTORS)
    return FamilyHelp(
        models=f"DiT family: {' | '.join(FAMILIES)} (default: {next(iter(FAMILIES))})",
        weights="a local diffusers folder, a transformer .safetensors, or a bundled model (" + "; ".join(bundled)
                + f"; default: {'; '.join(weights)})",
        plan="; ".join(plans),
        backends=" | ".join(BACKENDS),
        predictors=predictors,
        defaults=CacheConfig(),
        axes={axis: (words(texts), default(axis), next(iter(texts))) for axis, texts in helps.items()},
        ranged_axes=tuple(RANGED_AXES),
    )
