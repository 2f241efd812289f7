"""The weights an engine was built from, as eager PyTorch sees them: the whole diffusers transformer (the eager
backend's graphs, an eager twin for bench and compare) and some of its base weights by name (what a LoRA is
fused onto), each checked against the manifest's record of the weights before it is used."""

from __future__ import annotations

import dataclasses

import torch

from svdexport.models import family
from svdexport.models.sparse_processor import install_recorded
from svdexport.runtime.manifest import Manifest


def base_model(manifest: Manifest, device: str | None = None) -> torch.nn.Module:
    """The diffusers transformer of the weights the engine was built from (checked unchanged), in its dtype."""
    fam = family(manifest.model.family)
    recorded = dataclasses.asdict(manifest.model.weights)
    info = fam.inspect(recorded["source"])
    loaded = fam.load_weights(info, getattr(torch, manifest.dtype))  # mapped: nothing read until checked
    if loaded.files:  # the digest of the very bytes mapped (or of the same files, unchanged, from the cache)
        info.verify_loaded(recorded, loaded.files, content=manifest.signed)
    else:  # generated (bundled) weights: their digest once they exist
        info.verify(recorded, content=manifest.signed)
    return loaded.model.to(device or manifest.device)


def base_weights(manifest: Manifest, names: list[str]) -> dict[str, torch.Tensor]:
    """Some of the engine's base weights, by their names in the diffusers transformer, in its dtype and checked
    unchanged (WeightsInfo.verify). Read alone from the safetensors files of
    a diffusers folder (a LoRA's modules: a few hundred MB of FLUX.1's 23 GB); where a name is not in them
    (generated weights, single files in other layouts) taken from the whole model, loaded as a build loads it."""
    fam = family(manifest.model.family)
    recorded = dataclasses.asdict(manifest.model.weights)
    info = fam.inspect(recorded["source"])
    files = [f for f in info.files if f.endswith(".safetensors")]
    if files:
        info.verify(recorded, content=manifest.signed)
        found = read_tensors(files, set(names), getattr(torch, manifest.dtype))
        if len(found) == len(set(names)):
            return found
    plain = dict(base_model(manifest, device="cpu").named_parameters())
    return {n: plain[n].detach() for n in names}


def read_tensors(files: list[str], names: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors `names` found in safetensors `files`, floating ones cast to `dtype` (as from_pretrained does)."""
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in names & set(st.keys()):
                t = st.get_tensor(name)
                # A copy, never the file's mapping: PEFT merges in place, and a write into mapped pages faults
                # each 4 KiB page copy-on-write (1.6 s for FLUX.1's 0.9 GB of adapted weights; 0.3 s copied).
                out[name] = t.to(dtype, copy=True) if t.is_floating_point() else t.clone()
    return out


def eager_graphs(manifest: Manifest) -> tuple:
    """The engine's two graphs in eager PyTorch, from the weights it was built from (checked unchanged), with the
    sparse attention layout the engine was built with, if any (remade at its build shapes)."""
    fam, model = family(manifest.model.family), base_model(manifest)
    if manifest.attention is not None:
        install_recorded(model, fam.name, fam.shapes(manifest.shapes.build), manifest.attention.option)
    return fam.graphs(model, manifest.cache.granularity)


def skeleton_graphs(manifest: Manifest) -> tuple:
    """The engine's two graphs built from its config alone, every weight on the meta device (a compiled backend binds
    the engine's constants to them by name: export.with_constants), with its sparse attention layout, if any."""
    fam = family(manifest.model.family)
    with torch.device("meta"):
        model = fam.transformer_class().from_config(manifest.model.config).to(getattr(torch, manifest.dtype))
    if manifest.attention is not None:
        install_recorded(model, fam.name, fam.shapes(manifest.shapes.build), manifest.attention.option)
    return fam.graphs(model.eval().requires_grad_(False), manifest.cache.granularity)
