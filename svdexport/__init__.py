"""svdexport: SVD-Cache feature caching for Diffusion Transformers, as static compiled engines."""

__version__ = "0.3.0"  # 0.3: calibrated step plans in the manifest; engines of 0.2 are refused, rebuild them


def load(engine_dir, trusted_keys=None):
    """Loads a built engine folder (verifying its manifest and hashes); returns an Engine whose
    `generate(...)` runs the step scheduler over the engine's graphs (`close()` or `with` releases it).

    Security: an engine is code. AOTInductor packages are native shared libraries that are loaded into this
    process, and the inductor and tensorrt backends unpickle programs; the manifest's hashes only catch
    accidents, since anyone can recompute them. Load only engines you built, or engines signed
    (`svdexport sign`) by a key you trust: `trusted_keys` (public key files from `svdexport keygen`), or the
    SVDEXPORT_TRUSTED_KEYS environment variable (paths joined by os.pathsep), makes the load refuse an
    unsigned or wrongly signed engine before anything else in it is read."""
    from svdexport.runtime.engine import load as _load

    return _load(engine_dir, trusted_keys=trusted_keys)


def apply(pipe, engine, **cache_overrides):
    """Puts an engine (an Engine or its folder) into a diffusers pipeline of its family (FluxPipeline and its
    img2img / inpainting variants, HunyuanVideoPipeline) in place of its transformer; returns the pipeline.
    Keyword overrides (interval, warmup, predictor, beta, order) change the step plan."""
    from svdexport.runtime.pipeline import apply as _apply

    return _apply(pipe, engine, **cache_overrides)


__all__ = ["__version__", "apply", "load"]
