"""What the MMDiT families (FLUX, HunyuanVideo, SD3) share: cache sites declared per block list (`BlockList`,
`Site`), the hooks that capture them, the gated rebuild of the image stream on cached steps, the cached-step
graph's parts, and `MMDiTFamily`, the family base with weights handling, sites and the memory estimate.

Nothing here names a family's modules: a family says which module lists hold its blocks, which submodule
output each site is and which modulation chunk gates it (`blocks`), and which module embeds the latents
(`latent_embedder`).
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Site:
    """One cache site of a block: the image-stream update the block adds, before its gate."""

    part: str  # the site's name in the block ("attn"; "" for a block's only site)
    module: str  # the block's submodule whose output (the first, for a tuple) is the feature
    gate: int  # the chunk of the block's modulation, norm.linear(norm.silu(temb)).chunk(n), that gates it
    joined: bool = False  # the output is the joined text and image sequence: the image tokens are kept
    only_in: str | None = None  # the config key listing the blocks that have this site (None: every block)

    def in_block(self, config: dict, index: int) -> bool:
        return self.only_in is None or index in (config.get(self.only_in) or ())


@dataclass(frozen=True)
class BlockList:
    """A module list of blocks of one kind: their modulation layer and their sites, in the order they run."""

    prefix: str  # site names f"{prefix}.{i}.{part}" ("double.0.attn"), f"{prefix}.{i}" for part ""
    attribute: str  # the transformer's ModuleList of these blocks
    count: str  # the config key of its length
    norm: str  # the block's AdaLayerNormZero-style modulation layer (`linear`, `silu`)
    sites: tuple[Site, ...]

    def block_sites(self, config: dict, index: int) -> list[Site]:
        return [s for s in self.sites if s.in_block(config, index)]

    def site_names(self, config: dict) -> list[str]:
        return [f"{self.prefix}.{i}" + (f".{s.part}" if s.part else "") for i in range(config[self.count])
                for s in self.block_sites(config, i)]


# FLUX's and HunyuanVideo's: double-stream blocks with AdaLayerNormZero (shift, scale, gate of the attention,
# then of the MLP), and single-stream blocks over the joined sequence with AdaLayerNormZeroSingle (shift,
# scale, gate), whose proj_out output holds both the attention and the MLP.
DOUBLE = BlockList("double", "transformer_blocks", "num_layers", "norm1",
                   (Site("attn", "attn", 2), Site("ff", "ff", 5)))
SINGLE = BlockList("single", "single_transformer_blocks", "num_single_layers", "norm",
                   (Site("", "proj_out", 2, joined=True),))


def _first(out):
    return out[0] if isinstance(out, tuple) else out  # a joint attention returns (image, context)


def site_hooks(transformer: nn.Module, granularity: str, blocks: tuple[BlockList, ...],
               image_tokens: Callable[[torch.Tensor], torch.Tensor]) -> list[tuple[nn.Module, Extractor, bool]]:
    """Hooks for SiteRecorder, in `sites` order. "final": the image tokens entering norm_out. "block": each
    block's sites (`image_tokens` picks the image tokens of a joined sequence), all before their gates."""
    if granularity == "final":
        return [(transformer.norm_out, lambda args, out: args[0], True)]
    config, hooks = dict(transformer.config), []
    for kind in blocks:
        for i, block in enumerate(getattr(transformer, kind.attribute)):
            for site in kind.block_sites(config, i):
                joined = lambda args, out: image_tokens(_first(out))  # noqa: E731
                pick = joined if site.joined else (lambda args, out: _first(out))
                hooks.append((getattr(block, site.module), pick, False))
    return hooks


class GatedRebuild(nn.Module):
    """The image stream of a cached step at block granularity: embedded latents plus, per site, the
    current step's gate times the reconstructed feature, in the order the blocks add them. Exact when the
    features are exact.

    Holds only the blocks' modulation layers (as `{prefix}_norms`), none of the attention or MLP weights.
    """

    def __init__(self, transformer: nn.Module, blocks: tuple[BlockList, ...]):
        super().__init__()
        config = dict(transformer.config)
        self.lists: list[tuple[str, list[tuple[int, list[int]]]]] = []  # per list: (chunks, gates) per block
        for kind in blocks:
            norms = nn.ModuleList(getattr(b, kind.norm) for b in getattr(transformer, kind.attribute))
            setattr(self, f"{kind.prefix}_norms", norms)
            self.lists.append((f"{kind.prefix}_norms", [
                (n.linear.out_features // n.linear.in_features, [s.gate for s in kind.block_sites(config, i)])
                for i, n in enumerate(norms)]))

    def forward(self, h: torch.Tensor, temb: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        site = 0
        for attribute, gates in self.lists:
            for norm, (chunks, picks) in zip(getattr(self, attribute), gates):
                mod = norm.linear(norm.silu(temb)).chunk(chunks, dim=1)
                for g in picks:
                    h = h + mod[g].unsqueeze(1) * features[site]
                    site += 1
        return h


class CachedStepGraph(nn.Module):
    """What every cached-step graph holds: the time/text embedder and the output head, plus at block
    granularity the family's latent embedder (as `x_embedder`) and the gated rebuild. Its input names are
    the family's contract (`GraphContract.bind`)."""

    def __init__(self, transformer: nn.Module, granularity: str, family: "MMDiTFamily"):
        super().__init__()
        block = granularity == "block"
        self.x_embedder = getattr(transformer, family.latent_embedder) if block else None
        self.rebuild = GatedRebuild(transformer, family.blocks) if block else None
        self.time_text_embed = transformer.time_text_embed
        self.norm_out = transformer.norm_out
        self.proj_out = transformer.proj_out

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
    blocks: ClassVar[tuple[BlockList, ...]] = (DOUBLE, SINGLE)  # the block lists, in the order they run
    latent_embedder: ClassVar[str] = "x_embedder"  # the transformer's module that embeds the latents as tokens

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
        return [name for kind in self.blocks for name in kind.site_names(config)]

    def site_hooks(self, transformer: nn.Module, granularity: str,
                   image_tokens: Callable[[torch.Tensor], torch.Tensor]) -> list[tuple[nn.Module, Extractor, bool]]:
        return site_hooks(transformer, granularity, self.blocks, image_tokens)

    def peer_probe(self, transformer: nn.Module) -> nn.Module:
        """The last block's query norm (run by the attention processor, fused QKV or not), else its query
        projection: a hook on the block or on the attention module would fire also when a cache hook
        short-circuits it."""
        attn = getattr(transformer, self.blocks[-1].attribute)[-1].attn
        return attn.norm_q if attn.norm_q is not None else attn.to_q

    def sampler_config(self, weights: str | None, config: dict) -> dict:
        if weights is not None and not weights.startswith("bundled"):
            path = Path(weights) / "scheduler" / "scheduler_config.json"
            if path.exists():
                return wt.config_kwargs(wt.read_json(path))
        return self.family_sampler(config)

    def family_sampler(self, config: dict) -> dict:
        """The family's own scheduler config for a transformer config (override for variants)."""
        return dict(self.default_sampler)



def text_rows(config: dict, batch: int, text_len: int, seed: int, g: torch.Generator,
              conditioning=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(text embeddings, pooled embedding) of an example batch: `conditioning`'s rows for `seed` (class table,
    encoded prompts), else noise from `g` of the text encoders' widths."""
    if conditioning is None:
        enc = torch.randn(batch, text_len, config["joint_attention_dim"], generator=g)
        return enc, torch.randn(batch, config["pooled_projection_dim"], generator=g)
    rows = conditioning.pick(seed, batch)
    return rows["encoder_hidden_states"], rows["pooled_projections"]
