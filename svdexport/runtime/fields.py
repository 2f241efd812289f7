"""What an engine manifest's values may be beyond their JSON types; `manifest._parse` runs these checks.

A manifest's digest catches accidents, not edits (anyone can recompute it), so every value is refused here, in
one line naming its field, before it reaches code that would fail on it with a traceback: text that cannot
name a file or be printed (NUL, lone surrogates, thousands of characters), integers beyond the range of
the libraries below, shapes no machine could allocate, dtypes and devices torch does not know, a sampler
record diffusers cannot run, plans that are not plans.
"""

from __future__ import annotations

from typing import NoReturn

from svdexport.errors import SvdExportError, clip, first_line

TEXT_MAX = 4096  # characters of a manifest string: paths, hashes, config values (PATH_MAX)
NAME_MAX = 255  # characters of a class name or site name; bytes of one component of a file name
PROMPT_MAX = 1 << 16  # characters of one calibration prompt
INT_MAX = (1 << 63) - 1  # what torch and the C libraries below take
AXIS_MAX = 16384  # a build shape's axis: pixels, frames, text tokens, batch
ELEMENTS_MAX = 1 << 36  # elements of one graph input (HunyuanVideo's block residuals at 33 frames of 480x848: 3.5e9)
STEPS_MAX = 10000  # sampling steps
DTYPES = ("float32", "bfloat16", "float16")  # an engine's precision (build --dtype fp32 | bf16 | fp16)
DEVICES = ("cpu", "cuda")


def refuse(where: str, what: str) -> NoReturn:
    raise SvdExportError(f"manifest field {clip(where or 'manifest', 120)} {what}")


def text(value: str, where: str, limit: int = TEXT_MAX) -> str:
    if "\x00" in value:
        refuse(where, "holds a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        refuse(where, "is not valid Unicode (it holds a lone surrogate)")
    if len(value) > limit:
        refuse(where, f"is {len(value)} characters long (at most {limit})")
    return value


def integer(value: int, where: str) -> int:
    if not -INT_MAX <= value <= INT_MAX:
        refuse(where, f"is out of range ({len(str(abs(value)))} digits)")
    return value


def scan(value: object, where: str) -> object:
    """An untyped value (a diffusers config, the sampler, backend options): every string and integer in it
    checked, iteratively (files.parse_json bounds the nesting)."""
    stack = [(value, where)]
    while stack:
        x, at = stack.pop()
        if isinstance(x, str):
            text(x, at)
        elif isinstance(x, int) and not isinstance(x, bool):
            integer(x, at)
        elif isinstance(x, dict):
            for k, v in x.items():
                stack.append((v, f"{at}.{text(k, f'{at} (a key)')}"))
        elif isinstance(x, list):
            stack += [(v, f"{at}[{i}]") for i, v in enumerate(x)]
    return value


def _shape(dims: list[int], where: str) -> None:
    size = 1
    for d in dims:
        if d < 0:
            refuse(where, f"has a negative dimension ({d})")
        size *= d
        if size > ELEMENTS_MAX:
            refuse(where, f"is {dims}: more than {ELEMENTS_MAX} elements")


def shapes(record, where: str) -> None:
    """ShapesRecord: every axis a positive integer no larger than AXIS_MAX, every input shape allocatable."""
    for name in ("build", "min", "max"):
        for axis, v in (getattr(record, name) or {}).items():
            if not 1 <= v <= AXIS_MAX:
                refuse(f"{where}.{name}.{axis}", f"is {v}; a shape axis is between 1 and {AXIS_MAX}")
    for name, dims in record.inputs.items():
        _shape(dims, f"{where}.inputs.{name}")


def graph(spec, where: str) -> None:
    """GraphSpec: one shape and dtype per input, dtypes torch knows, allocatable shapes."""
    import torch

    if not spec.inputs or not spec.outputs:
        refuse(where, "names no inputs or no outputs")
    if not len(spec.inputs) == len(spec.input_shapes) == len(spec.input_dtypes):
        refuse(where, f"has {len(spec.inputs)} inputs, {len(spec.input_shapes)} input shapes and "
                      f"{len(spec.input_dtypes)} input dtypes")
    for i, (dims, dtype) in enumerate(zip(spec.input_shapes, spec.input_dtypes)):
        _shape(dims, f"{where}.input_shapes[{i}]")
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            refuse(f"{where}.input_dtypes[{i}]", f"is {clip(dtype)!r}, not a torch dtype")


def plan(record, where: str) -> None:
    """PlanRecord: full steps sorted, unique, inside the plan's steps, starting with 0."""
    if not 1 <= record.steps <= STEPS_MAX:
        refuse(f"{where}.steps", f"is {record.steps}; steps are between 1 and {STEPS_MAX}")
    full = record.full_steps
    if not full or full[0] != 0 or full != sorted(set(full)) or full[-1] >= record.steps:
        refuse(f"{where}.full_steps", f"is not a sorted list of step indices below {record.steps} starting with 0")


def calibration(record, where: str) -> None:
    if not 1 <= record.k_max <= AXIS_MAX:
        refuse(f"{where}.k_max", f"is {record.k_max}; it is between 1 and {AXIS_MAX}")
    for i, hw in enumerate(record.shapes):
        if len(hw) != 2 or not all(1 <= v <= AXIS_MAX for v in hw):
            refuse(f"{where}.shapes[{i}]", f"is not [height, width] with each between 1 and {AXIS_MAX}")
    for i, steps in enumerate(record.plan_steps):
        if not 1 <= steps <= STEPS_MAX:
            refuse(f"{where}.plan_steps[{i}]", f"is {steps}; steps are between 1 and {STEPS_MAX}")


def cache(config, where: str) -> None:
    try:
        config.validate()
    except SvdExportError as e:
        refuse(where, f"is invalid: {e}")


def manifest(m, where: str) -> None:
    """The whole manifest: its precision, device, steps, graphs, file names, class table and sampler."""
    import torch

    from svdexport.models import family

    if m.dtype not in DTYPES:
        refuse("dtype", f"is {clip(m.dtype)!r} (an engine is one of {', '.join(DTYPES)})")
    try:
        device = torch.device(m.device)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICES:
        refuse("device", f"is {clip(m.device)!r} (an engine runs on {' or '.join(DEVICES)})")
    if not 1 <= m.steps <= STEPS_MAX:
        refuse("steps", f"is {m.steps}; steps are between 1 and {STEPS_MAX}")
    if set(m.graphs) != {"full", "cached"}:
        refuse("graphs", "must name exactly the full and the cached graph")
    for name in [*m.files, m.graphs_dir or "", m.model.conditioning.file or ""]:
        if any(len(part.encode()) > NAME_MAX for part in name.split("/")):
            refuse("files", f"names {clip(name)!r}, whose components are longer than {NAME_MAX} bytes")
    cond = m.model.conditioning
    if cond.kind.value == "class-table" and (not cond.file or not cond.labels):
        refuse("model.conditioning", "of a class table needs its file and its labels")
    for i, site in enumerate(m.sites):
        if not 0 <= site.rank <= m.calibration.k_max:
            refuse(f"sites[{i}].rank", f"is {site.rank}; ranks are between 0 and k_max ({m.calibration.k_max})")
    fam = family(m.model.family)
    build = m.shapes.range(fam).opt  # the axes this family has, positive multiples where they must be
    try:  # diffusers' own scheduler over the record, as every run makes it
        sampling = fam.sampling(m.sampler)
        sampling.set_timesteps(sampling.scheduler(), m.steps, build)
    except Exception as e:
        first = first_line(e)
        refuse("sampler", f"is not a scheduler config diffusers can run: {clip(first, 160)}")


# ------------------------------------------------------------------ engine files against the manifest
def check_bases(m, vectors, path) -> None:
    """The bases file holds [sites, hidden size, k_max] floating vectors for this model and granularity."""
    from svdexport.models import family

    fam = family(m.model.family)
    want = (len(fam.sites(m.model.config, m.cache.granularity)), fam.hidden_size(m.model.config), m.calibration.k_max)
    if tuple(vectors.shape) != want or not vectors.is_floating_point():
        raise SvdExportError(f"bases file {path} holds {vectors.dtype} vectors of shape {tuple(vectors.shape)}; this "
                             f"engine needs {want} (sites x hidden size x k_max): rebuild the engine")


def check_table(m, table: dict, path) -> None:
    """The class table has a row per label of every tensor the family conditions on, of the shapes the graphs
    were built for (tried on the last label at the build shapes)."""
    import torch

    from svdexport.models import family
    from svdexport.models.family import Conditioning

    fam, labels = family(m.model.family), m.model.conditioning.labels
    shapes = fam.shapes(m.shapes.build)
    problem = None
    rows = {k: (v.shape[0] if v.dim() else 0) for k, v in table.items()}
    if any(n != len(labels) for n in rows.values()):
        problem = f"its rows ({', '.join(f'{k}: {n}' for k, n in rows.items())}) are not one per label ({len(labels)})"
    else:
        try:
            x = fam.example_inputs(m.model.config, shapes, 0, dtype=getattr(torch, m.dtype),
                                   conditioning=Conditioning(table, [len(labels) - 1] * shapes.batch))
        except KeyError as e:
            problem = f"it has no {e.args[0]!r} tensor (it has {clip(', '.join(sorted(table)))})"
        except Exception as e:
            problem = clip(first_line(e), 160)
        else:
            wrong = [k for k, want in m.shapes.inputs.items() if k in x and list(x[k].shape) != want]
            if wrong:
                problem = (f"its rows make {wrong[0]} of shape {tuple(x[wrong[0]].shape)}, the engine's graphs take "
                           f"{tuple(m.shapes.inputs[wrong[0]])}")
    if problem:
        raise SvdExportError(f"class table {path} does not fit this engine: {problem}; rebuild the engine")
