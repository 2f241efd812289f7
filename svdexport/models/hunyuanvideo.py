"""HunyuanVideo: diffusers' HunyuanVideoTransformer3DModel split into the two graphs.

The architecture is FLUX's MMDiT over frames x height x width tokens: double-stream blocks, then
single-stream blocks over (image, text), a token refiner for the text, and a guidance embedder. The cache
sites and the block-granularity cached step are therefore the shared ones of models/mmdit.py; what is
HunyuanVideo's own is here: 5-D latents and their patchify / unpatchify, the text attention mask, the raw
timestep convention (no division by 1000), the sampler (static shift 7) and the schedule (warmup 1,
interval 6, the paper's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from svdexport.errors import SvdExportError
from svdexport.models import mmdit, preview
from svdexport.models.family import Conditioning, GraphContract, GraphInput, RunDefaults, Sampling, Shapes, axis
from svdexport.models.hunyuanvideo_prompts import HunyuanVideoPrompts
from svdexport.models.mmdit import SiteRecorder, rebuilt, split_sites
from svdexport.models.weights import WeightsInfo

BUNDLED_DIR = Path(__file__).parent / "bundled"
# The paper's HunyuanVideo schedule: 50 steps, warmup 1, interval 6 -> 9 full steps.
DEFAULTS = RunDefaults(steps=50, warmup=1, interval=6)
# hunyuanvideo-community/HunyuanVideo's scheduler/scheduler_config.json.
SAMPLER_CONFIG = {"num_train_timesteps": 1000, "shift": 7.0, "use_dynamic_shifting": False}
TEMPORAL, SPATIAL = 4, 8  # the causal 3-D VAE: 4 frames and 8x8 pixels per latent


@dataclass
class VideoShapes(Shapes):
    batch: int = axis(1, "videos per call")
    # 8x8 pixels per latent, 2x2 latents per token
    height: int = axis(480, "frame height in pixels")
    width: int = axis(848, "frame width in pixels")
    text_len: int = axis(256, "text tokens (HunyuanVideo's Llama prompt length)")
    # The VAE keeps the first frame and packs 4 per latent after it.
    frames: int = axis(33, "video frames, 4k + 1")

    def validate(self) -> "VideoShapes":
        if self.frames < 1 or (self.frames - 1) % TEMPORAL:
            raise SvdExportError(f"frames={self.frames} must be 4k + 1 (1, 5, 9, ...)")
        super().validate()
        return self

    @property
    def latent(self) -> tuple[int, int, int]:
        """(latent frames, latent height, latent width)."""
        return (self.frames - 1) // TEMPORAL + 1, self.height // SPATIAL, self.width // SPATIAL

    @property
    def img_tokens(self) -> int:
        f, h, w = self.latent
        return f * (h // 2) * (w // 2)


class HunyuanVideoSampling(Sampling):
    """HunyuanVideoPipeline's rule: sigmas linspace(1, 0, steps + 1) without the last, shifted by the
    config; the scheduler's timestep passed as is (0..1000)."""

    def set_timesteps(self, scheduler, steps: int, shapes: Shapes) -> torch.Tensor:
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
        return scheduler.timesteps

    def model_timestep(self, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # Contiguous, one value per row (the graph boundary would make it so too: issue 24).
        return t.expand(latents.shape[0]).to(latents.device, latents.dtype).contiguous()


# ---------------------------------------------------------------------------------------------- graphs


class HunyuanVideoFullGraph(nn.Module):
    """The unmodified transformer forward, returning also C and R of every cache site."""

    def __init__(self, transformer, granularity: str, family: mmdit.MMDiTFamily):
        super().__init__()
        self.transformer = transformer
        self.text_len = 0  # set per call; single-stream blocks join (image, text): image tokens come first
        self.recorder = SiteRecorder(family.site_hooks(transformer, granularity,
                                                       lambda out: out[:, : out.shape[1] - self.text_len]))

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, pooled_projections,
                bases, guidance=None):
        self.text_len = encoder_hidden_states.shape[1]
        self.recorder.start()
        try:
            out = self.transformer(hidden_states=hidden_states, timestep=timestep,
                                   encoder_hidden_states=encoder_hidden_states,
                                   encoder_attention_mask=encoder_attention_mask,
                                   pooled_projections=pooled_projections, guidance=guidance, return_dict=False)[0]
        finally:
            features = self.recorder.stop()
        coeffs, residuals = split_sites(torch.stack(features), bases)
        return out, coeffs, residuals


class HunyuanVideoCachedGraph(mmdit.CachedStepGraph):
    """Cached step: the image stream rebuilt from the reconstructed features (block granularity) or the
    reconstructed last hidden state (final), then norm_out, proj_out and unpatchify to the latents' shape.

    `hidden_states` is an input at both granularities: the block rebuild embeds it, and its shape gives
    the frames x height x width that unpatchify restores.
    """

    def forward(self, hidden_states, timestep, pooled_projections, bases, coeffs, residuals, guidance=None):
        dtype = self.proj_out.weight.dtype
        temb = self.time_text_embed(timestep, pooled_projections, guidance)[0]  # (conditioning, token_replace)
        h = self.image_stream(hidden_states, temb, rebuilt(coeffs, residuals, bases, dtype))
        return unpatchify(self.proj_out(self.norm_out(h, temb)), hidden_states.shape)


def unpatchify(tokens: torch.Tensor, latent_shape) -> torch.Tensor:
    """proj_out's [B, tokens, C*4] back to latents [B, C, F, H, W], as the transformer's forward does."""
    b, _, f, h, w = latent_shape
    x = tokens.reshape(b, f, h // 2, w // 2, -1, 1, 2, 2).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)


# ---------------------------------------------------------------------------------------------- inputs


def example_inputs(config: dict, shapes: Shapes, seed: int, guidance_scale: float = 6.0,
                   dtype: torch.dtype = torch.float32, conditioning: Conditioning | None = None
                   ) -> dict[str, torch.Tensor]:
    """Seeded noise latents and conditioning of the model's widths.

    With `conditioning` (the bundled digits model's class table, or prompts encoded by the pipeline's text
    encoders) the conditioning is its rows, text masks included. Otherwise it is synthetic, with a text mask
    that marks the first three quarters of the tokens valid, so the padded-prompt path of the real model is
    exercised."""
    g = torch.Generator().manual_seed(seed)
    b, (f, h, w) = shapes.batch, shapes.latent
    latents = torch.randn(b, config["in_channels"], f, h, w, generator=g)
    if conditioning is not None:
        rows = conditioning.pick(seed, b)
        inputs = {"hidden_states": latents, "encoder_hidden_states": rows["encoder_hidden_states"],
                  "pooled_projections": rows["pooled_projections"]}
        inputs = {k: v.to(dtype) for k, v in inputs.items()}
        inputs["encoder_attention_mask"] = rows["encoder_attention_mask"].to(torch.int64)
    else:
        valid = max(1, (3 * shapes.text_len) // 4)
        inputs = {
            "hidden_states": latents,
            "encoder_hidden_states": torch.randn(b, shapes.text_len, config["text_embed_dim"], generator=g),
            "pooled_projections": torch.randn(b, config["pooled_projection_dim"], generator=g),
        }
        inputs = {k: v.to(dtype) for k, v in inputs.items()}
        mask = torch.zeros(b, shapes.text_len, dtype=torch.int64)
        mask[:, :valid] = 1
        inputs["encoder_attention_mask"] = mask
    if config.get("guidance_embeds"):
        # HunyuanVideoPipeline passes the guidance scale times 1000.
        inputs["guidance"] = torch.full((b,), guidance_scale * 1000.0, dtype=dtype)
    return inputs


# ---------------------------------------------------------------------------------------------- family


class HunyuanVideoFamily(mmdit.MMDiTFamily):
    name = "hunyuanvideo"
    class_name = "HunyuanVideoTransformer3DModel"
    shapes_type = VideoShapes
    # "random": the architecture at hidden 128, 2 + 2 blocks, seeded random weights (9 frames of 128x128).
    # "digits": the same size, 1 channel, trained on moving digits (scripts/train_reference_video.py).
    bundled = {"random": BUNDLED_DIR / "hunyuanvideo_tiny.json", "digits": BUNDLED_DIR / "hunyuanvideo_digits"}
    default_weights = "bundled:random"
    lora_loader = "HunyuanVideoLoraLoaderMixin"
    pipeline_parts = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")
    default_sampler = SAMPLER_CONFIG
    is_video = True
    prompts = HunyuanVideoPrompts()  # Llama + CLIP through HunyuanVideoPipeline (hunyuanvideo_prompts.py)
    # The text mask in int64 (1: a prompt token); guidance (the scale times 1000) in the model's dtype.
    conditioning_inputs = (GraphInput("encoder_hidden_states", tokens=True),
                           GraphInput("encoder_attention_mask", "int64"), GraphInput("pooled_projections"),
                           GraphInput("guidance"))
    # diffusers' hooks find HunyuanVideo's blocks by their registered classes, and cache-dit registers a
    # HunyuanVideo adapter: every peer runs on it as on FLUX (tests/test_peers.py runs each on both).
    peer_libraries = ("diffusers-taylorseer", "diffusers-fbcache", "diffusers-magcache", "cachedit-dbcache",
                      "cachedit-dbcache-taylorseer")

    def load_weights(self, info: WeightsInfo, dtype: torch.dtype) -> mmdit.MappedWeights:
        loaded = super().load_weights(info, dtype)
        config = loaded.model.config
        if (config.patch_size, config.patch_size_t) != (2, 1):
            raise SvdExportError(f"patch sizes {config.patch_size_t}x{config.patch_size}^2 are not HunyuanVideo's 1x2x2")
        return loaded

    def contract(self, config: dict, granularity: str) -> GraphContract:
        # hidden_states is a cached-graph input at both granularities: unpatchify takes the latents' shape.
        guidance = ["guidance"] if config.get("guidance_embeds") else []
        return self.declare(["hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask",
                             "pooled_projections", "bases", *guidance],
                            ["hidden_states", "timestep", "pooled_projections", "bases", "coeffs", "residuals",
                             *guidance])

    def graphs(self, transformer: nn.Module, granularity: str) -> tuple[nn.Module, nn.Module]:
        contract = self.contract(dict(transformer.config), granularity)
        return (contract.bind(HunyuanVideoFullGraph(transformer, granularity, self), "full"),
                contract.bind(HunyuanVideoCachedGraph(transformer, granularity, self), "cached"))

    def sampling(self, sampler_config: dict) -> HunyuanVideoSampling:
        return HunyuanVideoSampling(sampler_config)

    def run_defaults(self, config: dict, sampler_config: dict) -> RunDefaults:
        return DEFAULTS

    def example_inputs(self, config: dict, shapes: Shapes, seed: int, dtype: torch.dtype = torch.float32,
                       conditioning: Conditioning | None = None) -> dict[str, torch.Tensor]:
        return example_inputs(config, shapes, seed, dtype=dtype, conditioning=conditioning)

    def forward_kwargs(self, inputs: dict[str, torch.Tensor], timestep: torch.Tensor) -> dict:
        return {"hidden_states": inputs["hidden_states"], "timestep": timestep,
                "encoder_hidden_states": inputs["encoder_hidden_states"],
                "encoder_attention_mask": inputs["encoder_attention_mask"],
                "pooled_projections": inputs["pooled_projections"], "guidance": inputs.get("guidance"),
                "return_dict": False}

    def unpack(self, latents: torch.Tensor, shapes: Shapes) -> torch.Tensor:
        """Latents [B, C, F, H, W] as they are (already unpatchified), in float32."""
        return latents.detach().float()

    def video_frames(self, latents: torch.Tensor, shapes: Shapes) -> list[list]:
        """Per video, its frames: the first three latent channels, contrast-stretched per video."""
        return preview.video_frames(self.unpack(latents, shapes))

    def preview(self, latents: torch.Tensor, shapes: Shapes):
        """A frame grid: one row per video, one column per latent frame."""
        return preview.frame_grid(self.video_frames(latents, shapes))


HUNYUANVIDEO = HunyuanVideoFamily()
