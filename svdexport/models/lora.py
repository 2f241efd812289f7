"""LoRA files fused into a diffusers transformer, with diffusers' and PEFT's own code (no key maps here).

A file goes through the family's diffusers LoRA loader (`lora_state_dict`: diffusers' own names, Kohya and
BFL names converted by diffusers), is injected as a PEFT adapter (`load_lora_into_transformer`), merged with
its scale (`fuse_lora`) and the adapter removed again (`unload_lora`): what stays is the plain transformer
with the fused weights in its original parameters. Only the parameters of the modules PEFT wrapped change.

A pipeline running an engine keeps a `hollow` transformer instead of the real one: the same modules and
adapters, with placeholders for the base weights, into which diffusers loads LoRAs as usual; `install` puts
the engine's base weights of the adapted modules under them and `fuse_active` fuses them. `engine.load_lora`
fuses on a hollow transformer the same way (`fuse(fill=...)`).
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from svdexport.errors import SvdExportError, clip
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
            raise SvdExportError(f"--lora {clip(text)}: SCALE must be a number, got {clip(scale)!r}") from None
        return cls(Path(path), value).check()

    def check(self) -> "LoraFile":
        """The file exists and holds LoRA weights: checked before any work."""
        if importlib.util.find_spec("peft") is None:
            raise SvdExportError("loading a LoRA needs peft, which is not installed (pip install peft)")
        if not self.path.is_file():
            raise SvdExportError(f"LoRA file not found: {self.path}")
        if not self.scale == self.scale or abs(self.scale) == float("inf"):  # NaN or infinite
            raise SvdExportError(f"LoRA {self.path}: scale must be a finite number, got {self.scale}")
        keys = self.keys()
        if not any("lora" in k for k in keys):
            raise SvdExportError(f"{self.path} is not a LoRA: none of its {len(keys)} tensors is a lora_A/lora_B "
                                 "(diffusers, PEFT) or lora_down/lora_up (Kohya) weight")
        return self

    def keys(self) -> list[str]:
        """The tensor names of the file (its header only)."""
        try:
            from safetensors import safe_open

            with safe_open(str(self.path), "pt") as f:
                return list(f.keys())
        except Exception as e:
            raise SvdExportError(f"cannot read the LoRA {self.path} as safetensors: {str(e).splitlines()[0]}") from None

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


def install(transformer: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Puts base weights (by their plain names) under the adapted modules of a hollow transformer."""
    for name, module in tuner_modules(transformer).items():
        base = module.get_base_layer()
        for pname, _ in list(base.named_parameters(recurse=False)):
            if (t := tensors.get(f"{name}.{pname}")) is not None:
                setattr(base, pname, nn.Parameter(t, requires_grad=False))


def target_modules(keys, prefix: str) -> set[str]:
    """The modules a LoRA's keys under `prefix` adapt, named as diffusers names them when it makes the PEFT
    config: the key before ".lora" (utils.peft_utils.get_peft_kwargs), or before ".lokr_" for LoKr
    (_create_lokr_config). Keys of neither kind (full weights some files carry) adapt no module."""
    names = set()
    for key in keys:
        if key.startswith(prefix) and (".lora" in key or ".lokr_" in key):
            key = key[len(prefix):]
            names.add(key.rpartition(".lokr_")[0] if ".lokr_" in key else key.split(".lora")[0])
    return names


def check_targets(transformer: nn.Module, keys, prefix: str, what: str) -> None:
    """Refuses, in one line, a LoRA that adapts modules `transformer` does not have: PEFT adapts the ones it
    finds and drops the others' weights without a word, so a LoRA made for another model would load."""
    wanted = target_modules(keys, prefix)
    missing = sorted(wanted - {name for name, _ in transformer.named_modules()})
    if missing:
        shown = ", ".join(clip(m, 60) for m in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise SvdExportError(f"the LoRA {what} was made for another model: {len(missing)} of its {len(wanted)} target "
                             f"modules are not in this {type(transformer).__name__} ({shown})")


def check_adapter_call(transformer: nn.Module, args: tuple, kwargs: dict) -> None:
    """`check_targets` for a call of diffusers' `load_lora_adapter(source, prefix="transformer", ...)` (what a
    pipeline's `load_lora_weights` makes with the converted state dict), before it loads anything. A source
    that is neither a state dict nor a safetensors file (a Hub name) is left to diffusers."""
    source = args[0] if args else kwargs.get("pretrained_model_name_or_path_or_dict")
    prefix = args[1] if len(args) > 1 else kwargs.get("prefix", "transformer")
    if isinstance(source, dict):
        keys, what = list(source), f"adapter {kwargs.get('adapter_name') or ''}".strip()
    elif isinstance(source, (str, Path)) and Path(source).is_file():
        keys, what = LoraFile(Path(source)).keys(), str(source)
    else:
        return
    check_targets(transformer, keys, f"{prefix}." if prefix else "", what)


def fuse(transformer: nn.Module, loader_name: str, loras: list[LoraFile],
         fill: Callable[[list[str]], dict[str, torch.Tensor]] | None = None) -> Fused:
    """Fuses `loras` into `transformer` in place, one after the other.

    `fill`: `transformer` is hollow, and fill(names) gives the base weights of the modules a LoRA adapts, which
    are put under them before PEFT merges (only those are read: a LoRA's modules, not the whole model).
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
        check_targets(transformer, state, prefix, str(lora.path))
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
        if fill is not None and (missing := [n for n in params if n not in changed.base]):
            install(transformer, fill(missing))
            params = adapted_parameters(transformer)
        for name, p in params.items():
            changed.base.setdefault(name, p.detach().clone())  # unloading pushes these back, bit for bit
        with torch.no_grad():
            transformer.fuse_lora(lora_scale=lora.scale)
        transformer.unload_lora()  # back to the plain modules; the fused values stay in their parameters
        changed.params.update(_differing(params, changed.base))
    return changed


def adapter_tensors(transformer: nn.Module) -> list[torch.Tensor]:
    """The adapters' own weights (LoRA A and B, DoRA magnitudes): every tensor of a PEFT-wrapped module that is
    not its base layer's."""
    out = []
    for module in tuner_modules(transformer).values():
        base = module.get_base_layer()
        own = {id(t) for t in (*base.parameters(), *base.buffers())}
        out += [t for t in (*module.parameters(), *module.buffers()) if id(t) not in own]
    return out


def hollow(transformer: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of a diffusers transformer (module tree, config, PEFT adapters) whose base weights take no memory:
    each is a CPU placeholder of its shape and dtype viewing one element (stride 0). diffusers' LoRA loader and
    PEFT load adapters into it as into the real model (PEFT puts them on the base weight's device and dtype);
    it cannot run, and PEFT cannot merge into it (`install` the base weights first). `dtype`: the placeholders'
    floating dtype, instead of the model's."""
    keep = {id(t) for t in adapter_tensors(transformer)}
    memo = {}
    for t in (*transformer.parameters(), *transformer.buffers()):
        if id(t) not in keep:
            empty = torch.zeros((), dtype=dtype if dtype and t.is_floating_point() else t.dtype).expand(t.shape)
            memo[id(t)] = nn.Parameter(empty, requires_grad=False) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(transformer, memo)


def hollow_of(cls: type, config: dict, dtype: torch.dtype) -> nn.Module:
    """A hollow transformer of class `cls` and `config` (a pipeline loaded without its transformer)."""
    from svdexport.models.weights import config_kwargs

    with torch.device("meta"):  # nothing allocated; the placeholders replace the meta tensors
        model = cls.from_config(config_kwargs(config))
    return hollow(model.eval().requires_grad_(False), dtype)


_serials = itertools.count()


def adapter_state(transformer: nn.Module) -> tuple:
    """What the fused weights depend on, compared without reading a tensor: per adapted module its active,
    disabled and merged adapters, their scalings (set_adapters weights), and each adapter weight's identity
    (a serial number given on first sight: a reloaded adapter is new even where Python reuses an id) and
    version (an in-place hotswap bumps it)."""
    state = []
    for name, module in tuner_modules(transformer).items():
        weights = []
        for t in adapter_tensors(module):
            if not hasattr(t, "_svdexport_serial"):
                t._svdexport_serial = next(_serials)
            weights.append((t._svdexport_serial, t._version))
        state.append((name, tuple(module.active_adapters), module.disable_adapters, tuple(module.merged_adapters),
                      tuple(sorted(getattr(module, "scaling", {}).items())), tuple(weights)))
    return tuple(state)


def fuse_active(transformer: nn.Module) -> Fused:
    """Fuses, in place, the adapters loaded into `transformer` as its forward would apply them (PEFT's merge of
    each adapted module's active adapters with their `set_adapters` weights; modules whose adapters are
    disabled left as they are), removes the adapters, and returns the parameters whose values changed."""
    layers = tuner_modules(transformer)
    base = {n: p.detach().clone() for n, p in adapted_parameters(transformer).items()}
    with torch.no_grad():
        for module in layers.values():
            if not module.disable_adapters:
                module.merge()
    transformer.unload_lora()
    own = dict(transformer.named_parameters())
    return Fused(_differing({n: own[n] for n in base}, base), base)


def _differing(params: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters whose values fusing changed (a LoRA without bias terms leaves the biases as they are)."""
    return {n: p for n, p in params.items() if not torch.equal(p, base[n])}
