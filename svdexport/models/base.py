"""What every DiT family shares: capturing cache-site features with hooks, and the split into C and R.

A family adapter (one file per family, e.g. flux.py) provides:
- `load(weights, dtype)`: the real diffusers transformer, from the bundled config or a local path;
- `sites(granularity)`: the names of the cache sites, in graph order;
- `full_graph(granularity)` / `cached_graph(granularity)`: two nn.Modules with positional tensor I/O and
  an `input_names` list, the full one returning (output, C, R) for all sites stacked;
- `example_inputs(...)`, `sampler(...)`, `preview(...)`: conditioning, noise, the flow-match sampler
  and a PNG preview of the final latents.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from svdexport.cache.svd import split
from svdexport.errors import SvdExportError
from svdexport.runtime.files import fingerprint, sha256_files

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

    def stop(self) -> torch.Tensor:
        """Stacked features [sites, B, N, D], in registration order (the order blocks run)."""
        features, self.features = self.features, None
        return torch.stack(features)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def split_sites(features: torch.Tensor, bases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """C and R for stacked site features, in the features' dtype."""
    return split(features, bases.to(features))


def check_shapes(shapes, pixels_per_token: int) -> None:
    """The checks every family's static build shapes share: pixel sizes on the token grid, batch and
    text length positive."""
    for name in ("height", "width"):
        v = getattr(shapes, name)
        if v < pixels_per_token or v % pixels_per_token:
            raise SvdExportError(f"{name}={v} must be a positive multiple of {pixels_per_token}")
    if shapes.batch < 1 or shapes.text_len < 1:
        raise SvdExportError(f"batch and text_len must be >= 1, got {shapes.batch} and {shapes.text_len}")


def from_pretrained(cls, path, dtype: torch.dtype, **kwargs):
    """`cls.from_pretrained` offline in `dtype`. Newer diffusers renamed torch_dtype to dtype and warn about
    the old name, which every supported version still takes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
        return cls.from_pretrained(path, torch_dtype=dtype, local_files_only=True, **kwargs)


def parameter_count(module: nn.Module) -> int:
    """Distinct parameters a graph holds (shared submodules counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


@dataclass
class WeightsInfo:
    source: str  # "bundled" or the absolute path given with --weights
    config: dict  # the transformer's diffusers config
    files: list[str] = field(default_factory=list)  # weight files read, absolute paths, in hashing order
    pipeline_parts: list[str] = field(default_factory=list)  # text encoders / VAE found beside the transformer
    sha256: str = ""  # digest of the weights; set at load for the generated bundled model, else on demand
    conditioning: dict = field(default_factory=lambda: {"kind": "synthetic"})  # or a class table (file, labels)
    shapes: dict | None = None  # default build shapes the model declares (bundled models)

    def digest(self) -> str:
        if not self.sha256:
            self.sha256 = sha256_files([Path(f) for f in self.files], progress=True)
        return self.sha256

    def record(self) -> dict:
        """What a manifest keeps to check later that the same weights are loaded."""
        return {"source": self.source, "sha256": self.digest(),
                "files": fingerprint([Path(f) for f in self.files])}

    def verify(self, recorded: dict) -> None:
        """Refuses weights that differ from the build's; re-hashes only files whose size or mtime changed."""
        if self.files and fingerprint([Path(f) for f in self.files]) == recorded.get("files"):
            return
        if self.digest() != recorded.get("sha256"):
            raise SvdExportError(f"weights at {self.source} differ from the ones this engine was built from; rebuild it")


# ------------------------------------------------------------------------ what the MMDiT families share
# FLUX and HunyuanVideo (and SD3-style MMDiTs) have double-stream blocks with AdaLayerNormZero (`norm1`)
# and single-stream blocks with AdaLayerNormZeroSingle (`norm`), image and text streams joined in the
# single blocks. Their cache sites, and the cached step that rebuilds the image stream, are the same.


def sites(config: dict, granularity: str) -> list[str]:
    """Cache-site names in the order the graphs stack them."""
    if granularity == "final":
        return ["final"]
    double = [f"double.{i}.{part}" for i in range(config["num_layers"]) for part in ("attn", "ff")]
    return double + [f"single.{i}" for i in range(config["num_single_layers"])]


def hidden_size(config: dict) -> int:
    return config["num_attention_heads"] * config["attention_head_dim"]


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
