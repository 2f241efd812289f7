"""svdexport: SVD-Cache feature caching for Diffusion Transformers, as static compiled engines.

Thin on purpose: importing the package loads nothing heavy (torch, diffusers); `load` and `apply` import the
runtime when called, so that `svdexport --help` starts fast."""

from svdexport.version import __version__
from svdexport.quiet import hush_import_noise

hush_import_noise()  # logging levels only: imports nothing heavy


def load(engine_dir, trusted_keys=None, weights=None):
    """Loads a built engine folder (verifying its manifest and hashes); returns an Engine whose
    `generate(...)` runs the step scheduler over the engine's graphs (`close()` or `with` releases it).

    Security: an engine is code. AOTInductor packages are native shared libraries that are loaded into this
    process, and the inductor and tensorrt backends unpickle programs; the manifest's hashes only catch
    accidents, since anyone can recompute them. Load only engines you built, or engines signed
    (`svdexport sign`) by a key you trust: `trusted_keys` (public key files from `svdexport keygen`), or the
    SVDEXPORT_TRUSTED_KEYS environment variable (paths joined by os.pathsep), makes the load refuse an
    unsigned or wrongly signed engine before anything else in it is read.

    `trusted_keys=None` or `[]` names no key: the variable decides. Unset, no signature is required; set, a
    signature by one of its keys is; set but naming no key ("" or ":"), every load is refused. An empty list
    cannot switch a set variable off (unset it to load unsigned engines). Keys given replace the variable's.
    The files checked are the files loaded: each is hashed through a descriptor the engine keeps open until
    `close()`; weights outside the engine are hashed in full for a signed load.

    Weights: an engine built from a local checkpoint references its files (by sha256 and size) instead of
    copying them, and maps them at load. `weights`: where that checkpoint is now, if it moved (a file, or a
    folder whose .safetensors files are matched to the recorded ones by size and sha256). An unsigned load
    takes the sha256 of an unchanged file (same device, inode, size, mtime and ctime) from this user's hash
    cache; a signed load hashes every byte."""
    from svdexport.runtime.engine import load as _load

    return _load(engine_dir, trusted_keys=trusted_keys, weights=weights)


def apply(pipe, engine, **cache_overrides):
    """Puts an engine (an Engine or its folder) into a diffusers pipeline of its family (FluxPipeline and its
    img2img / inpainting variants, HunyuanVideoPipeline) in place of its transformer; returns the pipeline.
    Keyword overrides (interval, warmup, predictor, beta, order) change the step plan."""
    from svdexport.runtime.pipeline import apply as _apply

    return _apply(pipe, engine, **cache_overrides)


__all__ = ["__version__", "apply", "load"]
