"""LoRAs loaded into a pipeline after `svdexport.apply`: `pipe.load_lora_weights(file, adapter_name=...)`,
`pipe.set_adapters(names, adapter_weights=...)`, `delete_adapters`, `disable_lora` / `enable_lora` and
`pipe.unload_lora_weights()`, run by diffusers' and PEFT's own code on the engine-backed transformer.

The stand-in keeps a hollow copy of the pipeline's transformer (`models.lora.hollow`: the module tree, config
and adapters, with placeholders that take no memory for its base weights) and hands diffusers' calls on
`pipe.transformer` to it, so the LoRA loader converts and injects the files as it would into the real model.
At the first step of each pipeline call the stand-in compares the adapters' state with the one it pushed;
when it changed, the engine's LoRA state (`engine.lora`, runtime/loras.py) fuses the adapters onto the engine's
base weights of the adapted modules and pushes the weights that changed into the compiled graphs. No adapter
left pushes the base weights back, bit for bit.
"""

from __future__ import annotations

import torch

from svdexport.errors import SvdExportError
from svdexport.models.lora import adapter_state, check_adapter_call, tuner_modules
from svdexport.runtime.engine import Engine


class PipelineLoras:
    """The LoRA side of the engine-backed stand-in (`pipeline.EngineTransformer`, a diffusers ModelMixin so that
    the pipeline's LoRA methods reach it): the PEFT methods diffusers calls on `pipe.transformer` act on
    `self.hollow`, and `sync_loras` pushes their result into `self.engine.lora`."""

    engine: Engine
    hollow: torch.nn.Module

    def _hold(self, hollowed: torch.nn.Module) -> None:
        """Keeps the hollow transformer; the adapters it came with (loaded before `apply`) are pushed now, so a
        refusal comes from `apply` itself."""
        if any(m.merged for m in tuner_modules(hollowed).values()):
            raise SvdExportError("the pipeline's transformer has fused LoRAs (pipe.fuse_lora): call "
                                 "pipe.unfuse_lora() before svdexport.apply, which fuses the loaded adapters itself")
        self.hollow = hollowed  # a registered submodule: diffusers finds its PEFT layers in `modules()`
        self._token = object()  # this stand-in, in `engine.lora.source`
        self._pushed = ()  # the adapter state this stand-in last pushed: none yet
        self.sync_loras()

    def sync_loras(self) -> None:
        """Pushes the fused adapters into the engine when their state changed since this stand-in's last push
        (a cheap comparison: no tensor is read), or when something else replaced the engine's weights while
        the pipeline has adapters. A pipeline that never had adapters leaves the engine's LoRAs (engine.load_lora)
        as they are; once it has, its adapters replace them, and unloading them gives the base engine."""
        state = adapter_state(self.hollow)
        if state == self._pushed and (not state or self.engine.lora.source == (self._token, state)):
            return
        with torch.inference_mode(False):  # the engine keeps these weights beyond this call
            self.engine.lora.push_adapters(self.hollow, source=(self._token, state))
        self._pushed = state

    def _apply(self, fn, recurse: bool = True):
        # pipe.to(device, dtype) moves nothing here: the engine's device and dtype are fixed at build, and a
        # placeholder moved would become a full-size tensor.
        return self

    # diffusers' pipeline LoRA methods call these on pipe.transformer (ModelMixin): the hollow model runs them.
    def load_lora_adapter(self, *args, **kwargs) -> None:
        self.engine.lora.check_support()  # tensorrt: refused here, before anything is loaded
        check_adapter_call(self.hollow, args, kwargs)  # a LoRA of another model: refused, not half loaded
        self.hollow.load_lora_adapter(*args, **kwargs)

    def set_adapters(self, *args, **kwargs) -> None:
        self.hollow.set_adapters(*args, **kwargs)

    def set_adapter(self, *args, **kwargs) -> None:
        self.hollow.set_adapter(*args, **kwargs)

    def delete_adapters(self, *args, **kwargs) -> None:
        self.hollow.delete_adapters(*args, **kwargs)

    def unload_lora(self) -> None:
        self.hollow.unload_lora()

    def enable_lora(self) -> None:
        self.hollow.enable_lora()

    def disable_lora(self) -> None:
        self.hollow.disable_lora()

    def active_adapters(self) -> list[str]:
        return self.hollow.active_adapters()

    def unfuse_lora(self) -> None:
        pass  # nothing is ever merged into the hollow model (fuse_lora is refused)

    def fuse_lora(self, *args, **kwargs) -> None:
        raise SvdExportError("fuse_lora on a pipeline that runs an engine: the engine fuses the active adapters "
                             "into its weights at every call already; drop fuse_lora (and unload_lora_weights after "
                             "it) and set the LoRA scales with pipe.set_adapters(names, adapter_weights=...)")

    @property
    def peft_config(self) -> dict:
        return self.hollow.peft_config  # AttributeError without adapters, as diffusers' models have it
