"""A bases file of `svdexport calibrate` (builder/calibrate_only.py), and `build --bases FILE`, which takes one
back in instead of calibrating.

The file records what its bases were calibrated for (`Bases.origin`: the family, the weights' digest, the
granularity, the dtype); a build refuses, in one line and before any work on it, a file whose model, sites,
hidden size, k_max or granularity do not fit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from svdexport.cache.svd import Bases
from svdexport.errors import SvdExportError
from svdexport.files import sha256_file

if TYPE_CHECKING:  # builder.build imports this module
    from svdexport.builder import build as builder

ORIGIN_FORMAT = "svdexport.bases-origin/1"


def origin(p: "builder.Prepared", opts: "builder.BuildOptions") -> dict:
    return {"format": ORIGIN_FORMAT, "family": opts.model, "weights_sha256": p.info.digest(),
            "weights": p.info.source, "granularity": opts.cache.granularity, "dtype": opts.dtype}


def read(path: str | Path) -> Bases:
    """A `calibrate` output, or one line saying why it is not one."""
    path = Path(path)
    if not path.is_file():
        raise SvdExportError(f"--bases: file not found: {path}")
    bases = Bases.load(path)
    if bases.origin.get("format") != ORIGIN_FORMAT:
        raise SvdExportError(f"--bases: {path} does not say what it was calibrated for (not written by this "
                             "version's `svdexport calibrate`); run calibrate again")
    return bases


def defaults(path: str | Path) -> dict:
    """The build options a bases file fixes: granularity, tau and k_max (the CLI's defaults under --bases)."""
    bases = read(path)
    return {"granularity": bases.origin["granularity"], "tau": bases.tau, "k_max": bases.k_max}


def given_bases(p: "builder.Prepared", opts: "builder.BuildOptions") -> Bases:
    """`opts.bases`, checked against the build (before its calibration would start), without its origin (an
    engine's bases file is the same whether its bases were calibrated in the build or given)."""
    bases, where = read(opts.bases), f"--bases {opts.bases}"
    o = bases.origin
    if o.get("family") != opts.model:
        raise SvdExportError(f"{where} was calibrated for a {o.get('family')} model, this build is {opts.model}")
    if o.get("weights_sha256") != p.info.digest():
        raise SvdExportError(f"{where} was calibrated on other weights ({o.get('weights')}, sha256 "
                             f"{str(o.get('weights_sha256'))[:12]}...) than {p.info.source}")
    if o.get("granularity") != opts.cache.granularity:
        raise SvdExportError(f"{where} has granularity {o.get('granularity')}, the build "
                             f"{opts.cache.granularity} (--granularity)")
    if bases.sites != p.sites:
        raise SvdExportError(f"{where} has {len(bases.sites)} cache sites ({', '.join(bases.sites[:3])}...), the "
                             f"build's graphs {len(p.sites)}")
    dim = p.fam.hidden_size(p.info.config)
    if bases.vectors.shape[1] != dim:
        raise SvdExportError(f"{where} has bases of hidden size {bases.vectors.shape[1]}, the model {dim}")
    if bases.k_max != opts.cache.k_max:
        raise SvdExportError(f"{where} has k_max {bases.k_max}, the build {opts.cache.k_max} (--k-max)")
    if bases.tau != opts.cache.tau:
        raise SvdExportError(f"{where} kept tau {bases.tau} of the energy, the build asks {opts.cache.tau} (--tau)")
    return dataclasses.replace(bases, origin={})


def digest(path: str | Path) -> str:
    """The given file's sha256, for the build key (other bases, another engine)."""
    return sha256_file(Path(path))
