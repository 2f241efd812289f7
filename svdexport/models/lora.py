"""LoRA files fused into a diffusers transformer, with diffusers' and PEFT's own code (no key maps here).

A file goes through the family's diffusers LoRA loader (`lora_state_dict`: diffusers' own names, Kohya and
BFL names converted by diffusers), is injected as a PEFT adapter (`load_lora_into_transformer`), merged with
its scale (`fuse_lora`) and the adapter removed again (`unload_lora`): what stays is the plain transformer
with the fused weights in its original parameters. Only the parameters of the modules PEFT wrapped change.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from svdexport.errors import SvdExportError
from svdexport.quiet import quiet


@dataclass(frozen=True)
class LoraFile:
    """One LoRA as the user names it: `FILE[:SCALE]`."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraFile":
        """FILE or FILE:SCALE; a path that itself contains ':' is taken whole when it exists."""
        path, sep, scale = str(text).rpartition(":")
        if not sep or Path(text).exists():
            return cls(Path(text)).check()
        try:
            value = float(scale)
        except ValueError:
            raise SvdExportError(f"--lora {text}: SCALE must be a number, got {scale!r}") from None
        return cls(Path(path), value).check()

    def check(self) -> "LoraFile":
        """The file exists and holds LoRA weights: checked before any work."""
        if importlib.util.find_spec("peft") is None:
            raise SvdExportError("loading a LoRA needs peft, which is not installed (pip install peft)")
        if not self.path.is_file():
            raise SvdExportError(f"LoRA file not found: {self.path}")
        if not self.scale == self.scale or abs(self.scale) == float("inf"):  # NaN or infinite
            raise SvdExportError(f"LoRA {self.path}: scale must be a finite number, got {self.scale}")
        try:
            from safetensors import safe_open

            with safe_open(str(self.path), "pt") as f:
                keys = list(f.keys())
        except Exception as e:
            raise SvdExportError(f"cannot read the LoRA {self.path} as safetensors: {str(e).splitlines()[0]}") from None
        if not any("lora" in k for k in keys):
            raise SvdExportError(f"{self.path} is not a LoRA: none of its {len(keys)} tensors is a lora_A/lora_B "
                                 "(diffusers, PEFT) or lora_down/lora_up (Kohya) weight")
        return self

    def __str__(self) -> str:
        return f"{self.path}:{self.scale:g}"


def tuner_modules(transformer: nn.Module) -> dict[str, nn.Module]:
    """The modules PEFT wrapped with an adapter, by name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in transformer.named_modules() if isinstance(m, BaseTunerLayer)}


def adapted_parameters(transformer: nn.Module) -> dict[str, nn.Parameter]:
    """The base parameters of every adapted module, by their names in the plain (unwrapped) transformer."""
    out = {}
    for name, module in tuner_modules(transformer).items():
        for pname, p in module.get_base_layer().named_parameters(recurse=False):
            out[f"{name}.{pname}"] = p
    return out


@dataclass
class Fused:
    """What fusing changed: the parameters (holding the fused values) and their values before, by name."""

    params: dict[str, nn.Parameter]
    base: dict[str, torch.Tensor]


def fuse(transformer: nn.Module, loader_name: str, loras: list[LoraFile]) -> Fused:
    """Fuses `loras` into `transformer` in place, one after the other.

    A file whose keys match no module of this transformer is refused in one line (PEFT's own message). Only
    parameters whose values changed are returned (a LoRA without bias terms leaves the biases as they are)."""
    from diffusers import loaders

    loader = getattr(loaders, loader_name)
    changed = Fused({}, {})
    for i, lora in enumerate(loras):
        # FLUX's loader also returns the network alphas of files that carry them; other families' do not.
        with_alphas = "return_alphas" in inspect.signature(loader.lora_state_dict).parameters
        try:
            found = loader.lora_state_dict(str(lora.path), return_lora_metadata=True,
                                           **({"return_alphas": True} if with_alphas else {}))
            state, alphas, metadata = found if with_alphas else (found[0], None, found[1])
        except Exception as e:
            raise SvdExportError(f"diffusers cannot read the LoRA {lora.path}: {str(e).splitlines()[0]}") from None
        prefix = f"{loader.transformer_name}."
        if not any(k.startswith(prefix) for k in state):
            raise SvdExportError(f"the LoRA {lora.path} matches nothing in this model: none of its keys names a "
                                 f"{type(transformer).__name__} module (after diffusers' Kohya/BFL conversion)")
        try:
            with quiet():  # diffusers logs the failure before raising it; the raised line is the one shown
                loader.load_lora_into_transformer(state, transformer=transformer, adapter_name=f"svdexport_{i}",
                                                  metadata=metadata,
                                                  **({"network_alphas": alphas} if with_alphas else {}))
        except Exception as e:  # PEFT: "Target modules {...} not found in the base model", shape mismatches
            raise SvdExportError(f"the LoRA {lora.path} does not fit this model: {str(e).splitlines()[0]}") from None
        params = adapted_parameters(transformer)
        if not params:
            raise SvdExportError(f"the LoRA {lora.path} matches nothing in this model: PEFT adapted no module")
        for name, p in params.items():
            changed.base.setdefault(name, p.detach().clone())  # unloading pushes these back, bit for bit
        with torch.no_grad():
            transformer.fuse_lora(lora_scale=lora.scale)
        transformer.unload_lora()  # back to the plain modules; the fused values stay in their parameters
        changed.params.update({n: p for n, p in params.items() if not torch.equal(p, changed.base[n])})
    return changed


def fuse_loaded(transformer: nn.Module) -> tuple[nn.Module, Fused]:
    """A plain copy of a transformer with the adapters loaded into it (a pipeline's `load_lora_weights`,
    with their `set_adapters` weights) fused, and the parameters that differ from the original's base weights.
    The original keeps its adapters."""
    import copy

    fused = copy.deepcopy(transformer)
    base = {n: p.detach().clone() for n, p in adapted_parameters(fused).items()}
    with torch.no_grad():
        fused.fuse_lora()
    fused.unload_lora()
    own = dict(fused.named_parameters())
    return fused, Fused({n: own[n] for n in base if not torch.equal(own[n], base[n])}, base)
