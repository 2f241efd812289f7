"""svdexport: SVD-Cache feature caching for Diffusion Transformers, as static compiled engines."""

__version__ = "0.1.0"


def load(engine_dir, progress: bool = False):
    """Loads a built engine folder; returns an Engine whose `generate(...)` runs the step scheduler."""
    from svdexport.runtime.engine import load as _load

    return _load(engine_dir, progress=progress)


__all__ = ["__version__", "load"]
