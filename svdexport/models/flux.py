"""FLUX.1: diffusers' FluxTransformer2DModel split into a full-compute and a cached-step graph.

Cache sites (REFERENCE.md section 3):
- granularity "block": per double-stream block the image attention output and the image MLP output,
  per single-stream block the proj_out output on image tokens, all before their gates. A cached step
  rebuilds the image stream as x_embedder(latents) + sum(current gate x reconstructed feature), which
  equals the real forward exactly when the features are exact.
- granularity "final": the image tokens' hidden state entering norm_out; a cached step is
  norm_out + proj_out.

Checkpoint files are read in flux_checkpoint.py, the text encoders in flux_prompts.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from svdexport.models import flux_checkpoint, mmdit, preview
from svdexport.models.family import Conditioning, GraphContract, GraphInput, RunDefaults, Sampling, Shapes
from svdexport.models.flux_prompts import FluxPrompts
from svdexport.models.mmdit import SiteRecorder, rebuilt, split_sites
from svdexport.models.weights import WeightsInfo

BUNDLED_DIR = Path(__file__).parent / "bundled"
# FLUX.1's scheduler config (scheduler/scheduler_config.json of the dev and schnell repositories).
SAMPLER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
SCHNELL_SAMPLER_CONFIG = {**SAMPLER_CONFIG, "shift": 1.0, "use_dynamic_shifting": False}  # FLUX.1-schnell's
# Steps per image and schedule when the user gives none. dev: TaylorSeer's FLUX schedule, 9 full steps of
# 50. schnell (timestep-distilled, no guidance input): 4 steps, full / cached / full / cached.
DEV = RunDefaults(steps=50, warmup=3, interval=7)
SCHNELL = RunDefaults(steps=4, warmup=1, interval=2)


@dataclass
class FluxShapes(Shapes):
    """batch, 512x512 pixels (16 per latent token side: VAE 8 x 2x2 packing), 64 text tokens (512 for
    FLUX.1-dev, 256 for schnell): the base shapes with FLUX's defaults."""


class FluxSampling(Sampling):
    """FluxPipeline's rule: sigmas linspace(1, 1/steps), a resolution-dependent shift when the config
    asks for it, and the timestep passed to the transformer divided by 1000."""

    def set_timesteps(self, scheduler, steps: int, shapes: Shapes) -> torch.Tensor:
        sigmas = np.linspace(1.0, 1 / steps, steps)
        cfg = scheduler.config
        mu = None
        if cfg.use_dynamic_shifting:  # mu linear in the image token count (FluxPipeline's calculate_shift)
            slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
            mu = shapes.img_tokens * slope + cfg.base_shift - slope * cfg.base_image_seq_len
        scheduler.set_timesteps(sigmas=sigmas, mu=mu)
        return scheduler.timesteps

    def model_timestep(self, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # Contiguous, one value per row (the graph boundary would make it so too: issue 24).
        return (t.expand(latents.shape[0]).to(latents.device, latents.dtype) / 1000).contiguous()


# ----------------------------------------------------------------------------------------------- graphs


def _time_embedding(embed: nn.Module, timestep, pooled, guidance, dtype) -> torch.Tensor:
    # As FluxTransformer2DModel.forward: timestep and guidance arrive divided by 1000.
    t = timestep.to(dtype) * 1000
    if guidance is None:
        return embed(t, pooled)
    return embed(t, guidance.to(dtype) * 1000, pooled)


class _GivenRotary(nn.Module):
    """Stands in for the transformer's pos_embed inside the full graph: the rotary table is a graph input.

    diffusers computes it in float64, which TensorRT and some ONNX Runtime providers reject; `rotary`
    computes it the same way outside the engine and passes it in float32.
    """

    def __init__(self):
        super().__init__()
        self.table: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, ids):
        return self.table


class FluxFullGraph(nn.Module):
    """The unmodified transformer forward, returning also C and R of every cache site.

    Only the rotary position table differs: it comes in as inputs (rotary_cos, rotary_sin) instead of
    being computed in float64 from the position ids inside the graph.
    """

    def __init__(self, transformer: nn.Module, granularity: str, family: mmdit.MMDiTFamily):
        super().__init__()
        self.transformer = transformer
        self.text_len = 0  # set per call; single-stream sites keep the image tokens after the text
        # Single-stream blocks join (text, image): the image tokens come after the text.
        self.recorder = SiteRecorder(family.site_hooks(transformer, granularity, lambda out: out[:, self.text_len :]))
        self.given_rotary = _GivenRotary()

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, rotary_cos, rotary_sin,
                bases, guidance=None):
        self.text_len = encoder_hidden_states.shape[1]
        no_ids = rotary_cos.new_zeros(0, 3)  # the ids only feed pos_embed, which is swapped for the given table
        own_rotary, self.given_rotary.table = self.transformer.pos_embed, (rotary_cos, rotary_sin)
        self.transformer.pos_embed = self.given_rotary
        self.recorder.start()
        try:
            out = self.transformer(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=timestep,
                img_ids=no_ids,
                txt_ids=no_ids,
                guidance=guidance,
                return_dict=False,
            )[0]
        finally:
            features = self.recorder.stop()
            self.transformer.pos_embed, self.given_rotary.table = own_rotary, None
        coeffs, residuals = split_sites(torch.stack(features), bases)
        return out, coeffs, residuals


class FluxBlockCachedGraph(mmdit.CachedStepGraph):
    """Cached step at block granularity: embedded latents + gate x reconstructed feature, per site."""

    def forward(self, hidden_states, timestep, pooled_projections, bases, coeffs, residuals, guidance=None):
        dtype = self.proj_out.weight.dtype
        temb = _time_embedding(self.time_text_embed, timestep, pooled_projections, guidance, dtype)
        h = self.image_stream(hidden_states, temb, rebuilt(coeffs, residuals, bases, dtype))
        return self.proj_out(self.norm_out(h, temb))


class FluxFinalCachedGraph(mmdit.CachedStepGraph):
    """Cached step at final granularity: norm_out + proj_out of the reconstructed last hidden state."""

    def forward(self, timestep, pooled_projections, bases, coeffs, residuals, guidance=None):
        dtype = self.proj_out.weight.dtype
        temb = _time_embedding(self.time_text_embed, timestep, pooled_projections, guidance, dtype)
        h = self.image_stream(None, temb, rebuilt(coeffs, residuals, bases, dtype))
        return self.proj_out(self.norm_out(h, temb))


# ---------------------------------------------------------------------------------------------- inputs


def _image_ids(shapes: Shapes) -> torch.Tensor:
    # As FluxPipeline._prepare_latent_image_ids: (0, row, col) per latent token.
    h, w = shapes.height // shapes.pixels_per_token, shapes.width // shapes.pixels_per_token
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def rotary(config: dict, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary table (cos, sin) [text + image tokens, head_dim] as FluxPosEmbed computes it (float64,
    with diffusers' own function), returned in float32 for the engine."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    pos = torch.cat([txt_ids, img_ids]).detach().float().cpu()
    parts = [get_1d_rotary_pos_embed(dim, pos[:, i], theta=10000, repeat_interleave_real=True, use_real=True,
                                     freqs_dtype=torch.float64) for i, dim in enumerate(config["axes_dims_rope"])]
    cos = torch.cat([c for c, _ in parts], dim=-1).float()
    sin = torch.cat([s for _, s in parts], dim=-1).float()
    return cos.to(img_ids.device), sin.to(img_ids.device)


def example_inputs(config: dict, shapes: Shapes, seed: int, guidance_scale: float = 3.5,
                   dtype: torch.dtype = torch.float32, conditioning: Conditioning | None = None
                   ) -> dict[str, torch.Tensor]:
    """Seeded noise latents and conditioning of the transformer's shapes: `conditioning`'s rows (the bundled
    digits model's class table, encoded prompts), else seeded synthetic embeddings for the text encoders'."""
    g = torch.Generator().manual_seed(seed)
    b = shapes.batch
    latents = torch.randn(b, shapes.img_tokens, config["in_channels"], generator=g)
    enc, pooled = mmdit.text_rows(config, b, shapes.text_len, seed, g, conditioning)
    inputs = {"hidden_states": latents, "encoder_hidden_states": enc, "pooled_projections": pooled}
    inputs = {k: v.to(dtype) for k, v in inputs.items()}
    inputs["img_ids"] = _image_ids(shapes)
    inputs["txt_ids"] = torch.zeros(shapes.text_len, 3)
    inputs["rotary_cos"], inputs["rotary_sin"] = rotary(config, inputs["txt_ids"], inputs["img_ids"])
    if config.get("guidance_embeds"):
        inputs["guidance"] = torch.full((b,), guidance_scale, dtype=torch.float32)
    return inputs


# ----------------------------------------------------------------------------------------------- family


class FluxFamily(mmdit.MMDiTFamily):
    name = "flux"
    class_name = "FluxTransformer2DModel"
    shapes_type = FluxShapes
    # --weights bundled:NAME. "digits" (trained by scripts/train_reference_flux.py, class-conditioned, 64 image
    # tokens) is the default; "random": seeded random weights at 1024 image tokens, for latency work;
    # "flux1-reduced": FLUX.1-dev's full width (hidden 3072, 24 heads, joint attention 4096) at 2 double + 2
    # single blocks, seeded random: the real-size export path on a machine without 24 GB to spare.
    bundled = {"digits": BUNDLED_DIR / "flux_digits", "random": BUNDLED_DIR / "flux_tiny.json",
               "flux1-reduced": BUNDLED_DIR / "flux1_reduced.json"}
    default_weights = "bundled:digits"
    pipeline_parts = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")
    default_sampler = SAMPLER_CONFIG
    prompts = FluxPrompts(rotary)
    # The rotary table comes in as float32 (diffusers makes it in float64, which TensorRT refuses); guidance
    # in float32 as FluxPipeline passes it.
    conditioning_inputs = (GraphInput("encoder_hidden_states", tokens=True), GraphInput("pooled_projections"),
                           GraphInput("rotary_cos", "float32", None), GraphInput("rotary_sin", "float32", None),
                           GraphInput("guidance", "float32"))
    lora_loader = "FluxLoraLoaderMixin"
    peer_libraries = ("diffusers-taylorseer", "diffusers-fbcache", "diffusers-magcache", "cachedit-dbcache",
                      "cachedit-dbcache-taylorseer")

    def inspect_file(self, path: Path) -> WeightsInfo:
        return flux_checkpoint.inspect_file(path)

    def load_file(self, info: WeightsInfo, dtype: torch.dtype) -> mmdit.MappedWeights:
        return flux_checkpoint.load_file(info, dtype)

    def default_shapes(self, info: WeightsInfo) -> FluxShapes:
        # The model's own (bundled models say theirs); FLUX.1 at full width: 1024x1024 and 512 text tokens.
        if info.shapes:
            return FluxShapes(**info.shapes)
        if info.config["joint_attention_dim"] >= 4096:  # schnell's text encoder takes 256 tokens, dev's 512
            return FluxShapes(height=1024, width=1024, text_len=512 if info.config.get("guidance_embeds") else 256)
        return FluxShapes()

    def contract(self, config: dict, granularity: str) -> GraphContract:
        guidance = ["guidance"] if config.get("guidance_embeds") else []
        latents = ["hidden_states"] if granularity == "block" else []
        return self.declare(["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "rotary_cos",
                             "rotary_sin", "bases", *guidance],
                            [*latents, "timestep", "pooled_projections", "bases", "coeffs", "residuals", *guidance])

    def graphs(self, transformer: nn.Module, granularity: str) -> tuple[nn.Module, nn.Module]:
        contract = self.contract(dict(transformer.config), granularity)
        kind = FluxFinalCachedGraph if granularity == "final" else FluxBlockCachedGraph
        cached = kind(transformer, granularity, self)
        return contract.bind(FluxFullGraph(transformer, granularity, self), "full"), contract.bind(cached, "cached")

    def family_sampler(self, config: dict) -> dict:
        """FLUX.1-dev's, or schnell's for a full-width transformer without a guidance embedder."""
        schnell = not config.get("guidance_embeds") and config["joint_attention_dim"] >= 4096
        return dict(SCHNELL_SAMPLER_CONFIG if schnell else SAMPLER_CONFIG)

    def sampling(self, sampler_config: dict) -> FluxSampling:
        return FluxSampling(sampler_config)

    def run_defaults(self, config: dict, sampler_config: dict) -> RunDefaults:
        """schnell's for a model without guidance input whose sampler has no resolution shift, else dev's."""
        schnell = not config.get("guidance_embeds") and not sampler_config.get("use_dynamic_shifting", True)
        return SCHNELL if schnell else DEV

    def example_inputs(self, config: dict, shapes: Shapes, seed: int, dtype: torch.dtype = torch.float32,
                       conditioning: Conditioning | None = None) -> dict[str, torch.Tensor]:
        return example_inputs(config, shapes, seed, dtype=dtype, conditioning=conditioning)

    def forward_kwargs(self, inputs: dict[str, torch.Tensor], timestep: torch.Tensor) -> dict:
        return {"hidden_states": inputs["hidden_states"], "timestep": timestep, "guidance": inputs.get("guidance"),
                "pooled_projections": inputs["pooled_projections"],
                "encoder_hidden_states": inputs["encoder_hidden_states"], "txt_ids": inputs["txt_ids"],
                "img_ids": inputs["img_ids"], "return_dict": False}

    def unpack(self, latents: torch.Tensor, shapes: Shapes) -> torch.Tensor:
        """Packed latents [B, N, C*4] -> [B, C, 2h, 2w] (FluxPipeline's _unpack_latents, before the VAE)."""
        b, n, c4 = latents.shape
        h, w = shapes.height // shapes.pixels_per_token, shapes.width // shapes.pixels_per_token
        x = latents.detach().float().reshape(b, h, w, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c4 // 4, h * 2, w * 2)

    def preview(self, latents: torch.Tensor, shapes: Shapes):
        return preview.image_strip(self.unpack(latents, shapes))


FLUX = FluxFamily()
