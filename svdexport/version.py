"""The package version, in the base layer: the package `__init__` and the manifests both read it."""

__version__ = "0.4.0"  # 0.4: compiled engines bind their weights at load; engines of 0.3 are refused, rebuild them
