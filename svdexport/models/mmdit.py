"""What the MMDiT families (FLUX, HunyuanVideo, SD3-style) share: the cache sites of their double- and
single-stream blocks, the hooks that capture them, the gated rebuild of the image stream on cached
steps, and `MMDiTFamily`, the family base with weights handling, sites and the memory estimate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar

import torch
from torch import nn

from svdexport.cache.svd import reconstruct, split
from svdexport.errors import SvdExportError
from svdexport.models import weights as wt
from svdexport.models.family import Family, Shapes
from svdexport.models.mapped import MappedWeights, load_mapped
from svdexport.models.random_weights import bundled_checkpoint
from svdexport.models.weights import WeightsInfo

# Turns a hooked module's (args, output) into the site feature [B, N, D].
Extractor = Callable[[tuple, object], torch.Tensor]


class SiteRecorder:
    """Forward hooks that copy site features into a list while a full-graph call is recording.

    Hooks stay registered but are inert outside `recording`, so the unmodified transformer can still be
    called directly (the parity tests do). The flag is a Python attribute, not a tensor: nothing in the
    traced graph branches on tensor values.
    """

    def __init__(self, sites: list[tuple[nn.Module, Extractor, bool]]):
        # sites: (module, extractor, pre) with pre=True for a forward-pre hook (the module's input)
        self.features: list[torch.Tensor] | None = None
        self.handles = []
        for module, extract, pre in sites:
            if pre:
                hook = self._pre_hook(extract)
                self.handles.append(module.register_forward_pre_hook(hook))
            else:
                self.handles.append(module.register_forward_hook(self._hook(extract)))

    def _hook(self, extract: Extractor):
        def hook(module, args, output):
            if self.features is not None:
                self.features.append(extract(args, output))

        return hook

    def _pre_hook(self, extract: Extractor):
        def hook(module, args):
            if self.features is not None:
                self.features.append(extract(args, None))

        return hook

    def start(self) -> None:
        self.features = []

    def stop(self) -> list[torch.Tensor]:
        """The features recorded since start(), in registration order (the order blocks run); stack them once
        the forward has returned, so that a failing forward is not masked by an empty stack in `finally`."""
        features, self.features = self.features, None
        return features

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# Precision of the cache math in a bf16 (or fp16) engine. The split (C = F V, R = F - C V^T), the forecast of
# C and the reconstruction (F^ = P V^T + R) run in float32: the features are cast up before the split, the
# rebuilt features down after it. The coefficients (k columns) stay float32 between steps, since the forecast
# takes differences of nearly equal values; the residuals are stored in the model's dtype (their rounding is
# the bf16 model's own rounding of the feature), which halves the largest cache state (all sites x tokens x
# hidden at block granularity: 1.9 GB instead of 3.8 GB for FLUX.1 at 1024x1024). Measured on the bundled
# digits model (scripts/measure_precision.py, docs/precision.md): every choice here is within 0.1 dB of
# another; bf16 itself costs SVD-Cache about 0.6 dB at final granularity and nothing at block granularity.
CACHE_DTYPE = torch.float32
RESIDUAL_DTYPE: torch.dtype | None = None  # None: the model's dtype


def split_sites(features: torch.Tensor, bases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """C (cache dtype, float32) and R (the model's dtype) for stacked site features."""
    coeffs, residuals = split(features.to(CACHE_DTYPE), bases.to(features.device, CACHE_DTYPE))
    return coeffs, residuals.to(RESIDUAL_DTYPE or features.dtype)


def rebuilt(coeffs: torch.Tensor, residuals: torch.Tensor, bases: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """F^ = P V^T + R in the cache dtype, returned in the model's dtype for the blocks' gates and the head."""
    c = CACHE_DTYPE
    return reconstruct(coeffs.to(c), residuals.to(c), bases.to(c)).to(dtype)


# FLUX and HunyuanVideo (and SD3-style MMDiTs) have double-stream blocks with AdaLayerNormZero (`norm1`)
# and single-stream blocks with AdaLayerNormZeroSingle (`norm`), image and text streams joined in the
# single blocks. Their cache sites, and the cached step that rebuilds the image stream, are the same.


def site_hooks(transformer: nn.Module, granularity: str,
               image_tokens: Callable[[torch.Tensor], torch.Tensor]) -> list[tuple[nn.Module, Extractor, bool]]:
    """Hooks for SiteRecorder, in `sites` order. "final": the image tokens entering norm_out. "block":
    per double-stream block the image attention and MLP outputs, per single-stream block the image
    tokens of proj_out's output (`image_tokens` picks them from the joined sequence), all before gates."""
    if granularity == "final":
        return [(transformer.norm_out, lambda args, out: args[0], True)]
    hooks = []
    for block in transformer.transformer_blocks:
        hooks.append((block.attn, lambda args, out: out[0], False))  # (image, context) outputs
        hooks.append((block.ff, lambda args, out: out, False))
    for block in transformer.single_transformer_blocks:
        hooks.append((block.proj_out, lambda args, out: image_tokens(out), False))
    return hooks


class GatedRebuild(nn.Module):
    """The image stream of a cached step at block granularity: embedded latents plus, per site, the
    current step's gate times the reconstructed feature. Exact when the features are exact.

    Holds only the blocks' modulation layers, none of the attention or MLP weights the step skips.
    """

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.double_norms = nn.ModuleList(b.norm1 for b in transformer.transformer_blocks)
        self.single_norms = nn.ModuleList(b.norm for b in transformer.single_transformer_blocks)

    def forward(self, h: torch.Tensor, temb: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        site = 0
        for norm in self.double_norms:
            # AdaLayerNormZero chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
            mod = norm.linear(norm.silu(temb)).chunk(6, dim=1)
            h = h + mod[2].unsqueeze(1) * features[site]
            h = h + mod[5].unsqueeze(1) * features[site + 1]
            site += 2
        for norm in self.single_norms:
            gate = norm.linear(norm.silu(temb)).chunk(3, dim=1)[2]  # shift, scale, gate
            h = h + gate.unsqueeze(1) * features[site]
            site += 1
        return h


class CachedStepGraph(nn.Module):
    """What every cached-step graph holds: the time/text embedder and the output head, plus at block
    granularity the latent embedder and the gated rebuild; and its positional input names.

    `latents_input` makes `hidden_states` an input at final granularity too (a family whose output
    head needs the latents' shape); at block granularity it always is.
    """

    def __init__(self, transformer: nn.Module, granularity: str, latents_input: bool = False):
        super().__init__()
        block = granularity == "block"
        self.x_embedder = transformer.x_embedder if block else None
        self.rebuild = GatedRebuild(transformer) if block else None
        self.time_text_embed = transformer.time_text_embed
        self.norm_out = transformer.norm_out
        self.proj_out = transformer.proj_out
        latents = ["hidden_states"] if block or latents_input else []
        guidance = ["guidance"] if transformer.config.guidance_embeds else []
        self.input_names = latents + ["timestep", "pooled_projections", "bases", "coeffs", "residuals"] + guidance
        self.output_names = ["noise_pred"]

    def image_stream(self, hidden_states, temb: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The image tokens entering norm_out: rebuilt per block, or the reconstructed final site."""
        if self.rebuild is None:
            return features[0]
        return self.rebuild(self.x_embedder(hidden_states), temb, features)


class MMDiTFamily(Family):
    """A family over a diffusers MMDiT transformer: sites, hidden size, memory estimate, bundled and folder
    weights, and the scheduler config beside the weights. Subclasses add graphs, inputs and sampling."""

    bundled: ClassVar[dict[str, Path]] = {}  # bundled:NAME -> a committed folder or a JSON spec of random weights
    default_sampler: ClassVar[dict] = {}  # the scheduler config when the weights folder has none

    def transformer_class(self):
        """The diffusers class, imported only where a model is built: compiled engines run without it."""
        import diffusers

        return getattr(diffusers, self.class_name)

    def inspect(self, weights: str | None) -> WeightsInfo:
        found = wt.inspect_weights(weights, self.default_weights, self.bundled, self.class_name, self.pipeline_parts)
        if isinstance(found, WeightsInfo):
            return found
        return self.inspect_file(found)

    def inspect_file(self, path: Path) -> WeightsInfo:
        """A single checkpoint file; families that read them override this."""
        raise SvdExportError(f"{self.name} weights must be a diffusers folder (with transformer/), got {path}")

    def load(self, info: WeightsInfo, dtype: torch.dtype) -> nn.Module:
        return self.load_weights(info, dtype).model

    def load_weights(self, info: WeightsInfo, dtype: torch.dtype) -> MappedWeights:
        """The transformer and where its weights came from: views of the mapped checkpoint files (the weights
        once in memory), or generated for a bundled spec (no files)."""
        if info.source.startswith("bundled:") and not self.bundled[info.source.split(":", 1)[1]].is_dir():
            # A bundled spec of random weights: its checkpoint made once into this user's cache, then mapped.
            path, _ = bundled_checkpoint(self.transformer_class(), self.bundled[info.source.split(":", 1)[1]])
            info.files = [str(path)]
            return load_mapped(self.transformer_class(), info.config, [path], dtype, info.source)
        if Path(info.source).is_file():
            return self.load_file(info, dtype)
        return wt.load_folder(self.transformer_class(), info, dtype)

    def load_file(self, info: WeightsInfo, dtype: torch.dtype) -> MappedWeights:
        raise SvdExportError(f"{self.name} cannot load single checkpoint files")

    def parameters(self, config: dict) -> int:
        return wt.count_parameters(self.transformer_class(), config)

    def activation_bytes(self, config: dict, shapes: Shapes, itemsize: int) -> int:
        """The attention scores of one layer (float32 softmax, as the math fallback of CPU attention keeps
        them) and a few hidden-state buffers."""
        tokens = shapes.img_tokens + shapes.text_len
        scores = shapes.batch * config["num_attention_heads"] * tokens * tokens * 4 * 2
        return scores + shapes.batch * tokens * self.hidden_size(config) * itemsize * 16

    def default_shapes(self, info: WeightsInfo) -> Shapes:
        return self.shapes_type(**info.shapes) if info.shapes else self.shapes_type()

    def hidden_size(self, config: dict) -> int:
        return config["num_attention_heads"] * config["attention_head_dim"]

    def sites(self, config: dict, granularity: str) -> list[str]:
        if granularity == "final":
            return ["final"]
        double = [f"double.{i}.{part}" for i in range(config["num_layers"]) for part in ("attn", "ff")]
        return double + [f"single.{i}" for i in range(config["num_single_layers"])]

    def sampler_config(self, weights: str | None, config: dict) -> dict:
        if weights is not None and not weights.startswith("bundled"):
            path = Path(weights) / "scheduler" / "scheduler_config.json"
            if path.exists():
                return wt.config_kwargs(wt.read_json(path))
        return self.family_sampler(config)

    def family_sampler(self, config: dict) -> dict:
        """The family's own scheduler config for a transformer config (override for variants)."""
        return dict(self.default_sampler)
