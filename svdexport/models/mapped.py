"""A diffusers transformer whose weights are views of its mapped checkpoint files: the weights once in memory.

`from_pretrained` reads every tensor into memory it owns (and diffusers' single-file path converts on top of
that). Here the checkpoint's safetensors files are mapped (`tensorfile.MappedFile`), an optional layout
conversion runs over the mapped tensors, and the model is assembled on the meta device with
`load_state_dict(assign=True)`: a parameter in the build dtype is the file's bytes themselves; one in another
dtype is cast (a copy in the build dtype, the only copy). `origins` tells, for each weight the model takes
from the files, where its bytes are: what an engine references instead of copying.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from svdexport.errors import SvdExportError
from svdexport.tensorfile import Located, MappedFile, origins_of


@dataclass
class MappedWeights:
    """The model and where its weights came from."""

    model: nn.Module
    files: list[MappedFile]  # the mapped checkpoint files, in the order `origins` indexes them
    origins: dict[str, Located]  # parameter/buffer name in the model -> its bytes in `files`


def map_checkpoint(paths: list[str | Path]) -> tuple[list[MappedFile], dict[str, torch.Tensor]]:
    """The files mapped, and all their tensors by name (a name in two shards is refused)."""
    files = [MappedFile(p) for p in paths]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        for key in f.keys():
            if key in state:
                raise SvdExportError(f"the tensor {key[:120]!r} is in two weight files ({f.path.name} and another)")
            state[key] = f.tensor(key)
    return files, state


def config_kwargs(config: dict) -> dict:
    """A diffusers config without its bookkeeping keys (_class_name, _diffusers_version, ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def empty_model(cls, config: dict) -> nn.Module:
    """`cls(**config)` with its parameters on the meta device (nothing allocated) and its buffers made by the
    model's own init (position tables, which a checkpoint holds only when they are persistent)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return cls.from_config(config_kwargs(config))


def assemble(cls, config: dict, state: dict[str, torch.Tensor], where: str) -> nn.Module:
    """`cls(**config)` on the meta device, its weights taken from `state` (as they are: `load_mapped` casts);
    missing or unexpected names are refused in one line."""
    model = empty_model(cls, config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1:2] or str(e).splitlines()[:1]
        raise SvdExportError(f"cannot load {cls.__name__} weights from {where}: config and weights disagree "
                             f"({first[0].strip()[:200]})") from None
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:  # a buffer the init made on the meta device (it follows the default device) or a parameter
        raise SvdExportError(f"{where} leaves {meta[0]} of {cls.__name__} unset")
    return model.eval().requires_grad_(False)


def load_mapped(cls, config: dict, paths: list[str | Path], dtype: torch.dtype, where: str,
                convert: Callable[[dict], dict] | None = None) -> MappedWeights:
    """The model from the checkpoint files `paths`, its weights views of their mapping (cast where `dtype`
    differs); `convert` turns the files' names into diffusers' (a layout conversion), keeping views where it
    can."""
    files, state = map_checkpoint(paths)
    if convert is not None:
        state = convert(state)
    origins = origins_of(state, files)
    for name, t in state.items():  # casts one tensor at a time, each one's file pages dropped once copied
        if t.is_floating_point() and t.dtype != dtype:
            state[name] = t.to(dtype)
            if (o := origins.get(name)) is not None:
                files[o.file].drop(o.offset, o.offset + t.numel() * t.element_size())
    return MappedWeights(assemble(cls, config, state, where), files, origins)


def header_shapes(path: Path) -> dict[str, tuple]:
    """Tensor names and shapes of a .safetensors file, from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise SvdExportError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


class SingleCatAsView(TorchFunctionMode):
    """diffusers' single-file converters copy each part of a fused weight (q, k, v of a qkv matrix) with
    torch.cat([part]). A concatenation of one tensor is that tensor: under this mode the part stays a view of
    the mapped file, so an engine can reference its bytes in the user's checkpoint instead of copying them."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.cat and "out" not in kwargs:
            parts = args[0] if args else kwargs.get("tensors")
            if isinstance(parts, (list, tuple)) and len(parts) == 1:
                return parts[0]
        return func(*args, **kwargs)
