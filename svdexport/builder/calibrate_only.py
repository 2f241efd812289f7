"""`svdexport calibrate`: the bases alone, in a file that records what they were calibrated for, so that
`build --bases FILE` (builder/bases_file.py) can take them back in instead of calibrating."""

from __future__ import annotations

from pathlib import Path

from svdexport.builder import bases_file
from svdexport.builder import build as builder
from svdexport.cache.svd import Bases
from svdexport.errors import SvdExportError
from svdexport.files import atomic_file
from svdexport.models import family
from svdexport.outputs import check_file, output_lock


def calibrate_to_file(opts: builder.BuildOptions, out: Path, progress: bool = True) -> Bases:
    """The bases file, written atomically, with its origin (`Bases.origin`) for `build --bases`."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise SvdExportError(f"--out must end in .safetensors, got {out}")
    check_file(out, "--out", opts.force)  # before the work, not after it
    _serve_calibration_shapes(opts)
    with output_lock(out):
        p = builder.prepare(opts)
        bases = builder.run_calibration(p, opts, progress)
        bases.origin = bases_file.origin(p, opts)
        with atomic_file(out) as tmp:
            bases.save(tmp)
    return bases


def _serve_calibration_shapes(opts: builder.BuildOptions) -> None:
    """A bases file has no engine whose range the calibration shapes must lie in (the bases live in the feature
    dimension and serve every resolution): the range spans them and the build shape, so that `prepare` checks
    each only for being a valid shape."""
    if not opts.calib_shapes:
        return
    fam = family(opts.model)
    build = fam.shapes({**fam.default_shapes(fam.inspect(opts.weights)).to_dict(), **opts.shapes})
    for h, w in opts.calib_shapes:  # each a valid shape of the family (in one line naming the axis)
        fam.shapes({**build.to_dict(), "height": h, "width": w})
    for axis, values in (("height", [h for h, _ in opts.calib_shapes]), ("width", [w for _, w in opts.calib_shapes])):
        opts.min_shapes[axis] = min(*values, getattr(build, axis))
        opts.max_shapes[axis] = max(*values, getattr(build, axis))
