"""Seeded random weights for a diffusers transformer, made one tensor at a time: a checkpoint file, never the
whole model in memory (nor in float32 beside its bf16 copy).

Each tensor has a generator of its own, seeded from (seed, its name), so its values do not depend on the order
tensors are made in, on the dtype a build runs in, or on which other tensors exist. Values follow PyTorch's
default initialisation, which keeps activations at a sane scale at any depth: Linear and Conv weights and biases
uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), Embedding rows normal(0, 1), norm weights 1 and biases 0; any other
parameter normal(0, 0.02). They are drawn in float32 on the CPU and stored in float32, the canonical values a
build casts from (so a bf16 engine and its float32 eager twin hold the same weights, rounded).

A bundled spec (`bundled:random`, `bundled:flux1-reduced`) is made once into this user's cache
($XDG_CACHE_HOME/svdexport/bundled, by the spec's digest) and mapped from there like any checkpoint; delete the
cache and the same bytes are made again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from svdexport import tensorfile


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def values(module: nn.Module, param: str, shape: tuple[int, ...], seed: int, name: str) -> torch.Tensor:
    """The float32 values of `module`'s parameter `param` (full name `name`), by the module's kind."""
    g = _generator(seed, name)
    kind = type(module).__name__
    if "Norm" in kind:
        return torch.ones(shape) if param == "weight" else torch.zeros(shape)
    if isinstance(module, nn.Embedding):
        return torch.randn(shape, generator=g)
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        weight = module.weight
        fan_in = weight.shape[1] * math.prod(weight.shape[2:])
        bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
        return torch.empty(shape).uniform_(-bound, bound, generator=g)
    return torch.randn(shape, generator=g) * 0.02


def write_random(cls, config: dict, seed: int, path: Path) -> None:
    """A safetensors checkpoint of `cls(**config)` with seeded random float32 weights, streamed tensor by tensor;
    a persistent buffer (SD3's position table) holds the values the model's own init gives it."""
    from svdexport.models.mapped import empty_model

    model = empty_model(cls, config)  # parameters on the meta device, buffers made
    owners = {f"{m}.{p}".lstrip("."): (module, p) for m, module in model.named_modules()
              for p, _ in module.named_parameters(recurse=False)}
    state = model.state_dict()
    shapes = {name: (torch.float32, tuple(t.shape)) for name, t in state.items()}

    def make(name: str) -> torch.Tensor:
        if name not in owners:  # a buffer
            return state[name].float().contiguous()
        module, param = owners[name]
        return values(module, param, shapes[name][1], seed, name)

    tensorfile.write_lazy(path, shapes, make, {"format": "pt", "svdexport": "random weights", "seed": str(seed)})


def bundled_checkpoint(cls, spec_path: Path) -> tuple[Path, dict]:
    """(the checkpoint of a bundled random spec, made once into this user's cache; the spec's config)."""
    raw = Path(spec_path).read_bytes()
    spec = json.loads(raw)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha256(raw + cls.__name__.encode()).hexdigest()[:16]
    path = Path(base) / "svdexport" / "bundled" / f"{Path(spec_path).stem}-{digest}.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_random(cls, spec["config"], spec["seed"], path)
    return path, spec["config"]
