"""svdexport: SVD-Cache feature caching for Diffusion Transformers, as static compiled engines."""

__version__ = "0.1.0"


def load(engine_dir):
    """Loads a built engine folder (verifying its manifest and hashes); returns an Engine whose
    `generate(...)` runs the step scheduler over the engine's graphs."""
    from svdexport.runtime.engine import load as _load

    return _load(engine_dir)


__all__ = ["__version__", "load"]
