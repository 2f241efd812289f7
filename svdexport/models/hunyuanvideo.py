"""HunyuanVideo adapter: diffusers' HunyuanVideoTransformer3DModel split into the two graphs.

The architecture is FLUX's MMDiT over frames x height x width tokens: double-stream blocks, then
single-stream blocks over (image, text), a token refiner for the text, and a guidance embedder. The cache
sites and the block-granularity cached step are therefore the shared ones of models/base.py; what is
HunyuanVideo's own is here: 5-D latents and their patchify / unpatchify, the text attention mask, the raw
timestep convention (no division by 1000), the sampler (static shift 7) and the schedule (warmup 1,
interval 6, the paper's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image
from torch import nn

from svdexport.cache.svd import reconstruct
from svdexport.errors import SvdExportError
from svdexport.models import base, loading
from svdexport.models.base import SiteRecorder, WeightsInfo, split_sites
from svdexport.models.loading import read_prompts  # noqa: F401  (part of the family interface)

NAME = "hunyuanvideo"
CLASS_NAME = "HunyuanVideoTransformer3DModel"
BUNDLED_DIR = Path(__file__).parent / "bundled"
# "random": the architecture at hidden 128, 2 + 2 blocks, seeded random weights (9 frames of 128x128).
BUNDLED = {"random": BUNDLED_DIR / "hunyuanvideo_tiny.json"}
DEFAULT_WEIGHTS = "bundled:random"
PIPELINE_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")
# The paper's HunyuanVideo schedule: 50 steps, warmup 1, interval 6 -> 9 full steps.
DEFAULTS = {"steps": 50, "warmup": 1, "interval": 6}
# hunyuanvideo-community/HunyuanVideo's scheduler/scheduler_config.json.
SAMPLER_CONFIG = {"num_train_timesteps": 1000, "shift": 7.0, "use_dynamic_shifting": False}
TEMPORAL, SPATIAL = 4, 8  # the causal 3-D VAE: 4 frames and 8x8 pixels per latent
PIXELS_PER_TOKEN = SPATIAL * 2  # and 2x2 latent patches per token (patch_size 2)


def _transformer_class():
    from diffusers import HunyuanVideoTransformer3DModel  # imported only where a model is built

    return HunyuanVideoTransformer3DModel


@dataclass
class VideoShapes:
    batch: int = 1  # videos per call
    frames: int = 33  # video frames, 4k + 1 (the VAE keeps the first frame and packs 4 per latent after it)
    height: int = 480  # frame height in pixels, a multiple of 16
    width: int = 848  # frame width in pixels, a multiple of 16
    text_len: int = 256  # text tokens (HunyuanVideo's Llama prompt length)

    def validate(self) -> "VideoShapes":
        if self.frames < 1 or (self.frames - 1) % TEMPORAL:
            raise SvdExportError(f"frames={self.frames} must be 4k + 1 (1, 5, 9, ...)")
        base.check_shapes(self, PIXELS_PER_TOKEN)
        return self

    @property
    def latent(self) -> tuple[int, int, int]:
        """(latent frames, latent height, latent width)."""
        return (self.frames - 1) // TEMPORAL + 1, self.height // SPATIAL, self.width // SPATIAL

    @property
    def img_tokens(self) -> int:
        f, h, w = self.latent
        return f * (h // 2) * (w // 2)


Shapes = VideoShapes  # the name the family-agnostic code uses


# --------------------------------------------------------------------------------------------- weights


def inspect(weights: str | None) -> WeightsInfo:
    """What the weights are, without loading a tensor: bundled, or a local diffusers folder."""
    found = loading.inspect_weights(weights, DEFAULT_WEIGHTS, BUNDLED, CLASS_NAME, PIPELINE_PARTS)
    if not isinstance(found, WeightsInfo):
        raise SvdExportError(f"HunyuanVideo weights must be a diffusers folder (with transformer/), got {found}")
    return found


def load(weights: str | None, dtype: torch.dtype = torch.float32, info: WeightsInfo | None = None):
    info = info or inspect(weights)
    if info.source.startswith("bundled:") and not info.files:
        model = loading.generated(_transformer_class(), BUNDLED[info.source.split(":", 1)[1]], info, dtype)
    else:
        model = loading.load_folder(_transformer_class(), info, dtype)
    if (model.config.patch_size, model.config.patch_size_t) != (2, 1):
        raise SvdExportError(f"patch sizes {model.config.patch_size_t}x{model.config.patch_size}^2 are not "
                             "HunyuanVideo's 1x2x2")
    return model.eval().requires_grad_(False), info


def parameters(config: dict) -> int:
    return loading.count_parameters(_transformer_class(), config)


def activation_bytes(config: dict, shapes: VideoShapes, itemsize: int) -> int:
    """Attention scores of one layer (float32) and a few hidden-state buffers."""
    tokens = shapes.img_tokens + shapes.text_len
    scores = shapes.batch * config["num_attention_heads"] * tokens * tokens * 4 * 2
    return scores + shapes.batch * tokens * hidden_size(config) * itemsize * 16


def default_shapes(info: WeightsInfo) -> VideoShapes:
    return VideoShapes(**info.shapes) if info.shapes else VideoShapes()


def has_text_encoders(info: WeightsInfo) -> bool:
    return False  # HunyuanVideo's Llama prompt encoding is not wired in yet: synthetic conditioning


def load_table(path):
    raise SvdExportError("HunyuanVideo models have no class-conditioning table")


# ---------------------------------------------------------------------------------------------- graphs

sites, hidden_size = base.sites, base.hidden_size


class HunyuanVideoFullGraph(nn.Module):
    """The unmodified transformer forward, returning also C and R of every cache site."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer
        self.text_len = 0  # set per call; single-stream blocks join (image, text): image tokens come first
        guidance = ["guidance"] if transformer.config.guidance_embeds else []
        self.input_names = ["hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask",
                            "pooled_projections", "bases"] + guidance
        self.output_names = ["noise_pred", "coeffs", "residuals"]

    def bind(self, granularity: str) -> "HunyuanVideoFullGraph":
        self.recorder = SiteRecorder(base.site_hooks(self.transformer, granularity,
                                                     lambda out: out[:, : out.shape[1] - self.text_len]))
        return self

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
        coeffs, residuals = split_sites(features, bases)
        return out, coeffs, residuals


class HunyuanVideoCachedGraph(base.CachedStepGraph):
    """Cached step: the image stream rebuilt from the reconstructed features (block granularity) or the
    reconstructed last hidden state (final), then norm_out, proj_out and unpatchify to the latents' shape.

    `hidden_states` is an input at both granularities: the block rebuild embeds it, and its shape gives
    the frames x height x width that unpatchify restores.
    """

    def __init__(self, transformer, granularity: str):
        super().__init__(transformer, granularity, latents_input=True)

    def forward(self, hidden_states, timestep, pooled_projections, bases, coeffs, residuals, guidance=None):
        dtype = self.proj_out.weight.dtype
        temb = self.time_text_embed(timestep, pooled_projections, guidance)[0]  # (conditioning, token_replace)
        h = self.image_stream(hidden_states, temb, reconstruct(coeffs, residuals, bases.to(dtype)))
        return unpatchify(self.proj_out(self.norm_out(h, temb)), hidden_states.shape)


def unpatchify(tokens: torch.Tensor, latent_shape) -> torch.Tensor:
    """proj_out's [B, tokens, C*4] back to latents [B, C, F, H, W], as the transformer's forward does."""
    b, _, f, h, w = latent_shape
    x = tokens.reshape(b, f, h // 2, w // 2, -1, 1, 2, 2).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def graphs(transformer, granularity: str) -> tuple[nn.Module, nn.Module]:
    return HunyuanVideoFullGraph(transformer).bind(granularity), HunyuanVideoCachedGraph(transformer, granularity)


# ----------------------------------------------------------------------------------- inputs and sampler


def example_inputs(config: dict, shapes: VideoShapes, seed: int, guidance_scale: float = 6.0,
                   dtype: torch.dtype = torch.float32, table: dict | None = None,
                   labels: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Seeded noise latents and synthetic conditioning of the model's widths. The text mask marks the
    first three quarters of the tokens valid, so the padded-prompt path of the real model is exercised."""
    if labels is not None:
        raise SvdExportError("HunyuanVideo models are not class-conditioned; they take no labels")
    g = torch.Generator().manual_seed(seed)
    b, (f, h, w) = shapes.batch, shapes.latent
    valid = max(1, (3 * shapes.text_len) // 4)
    inputs = {
        "hidden_states": torch.randn(b, config["in_channels"], f, h, w, generator=g),
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


def model_timestep(t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    # HunyuanVideoPipeline passes the scheduler's timestep as is (0..1000), in the latents' dtype.
    return t.expand(latents.shape[0]).to(latents.dtype)


def make_sampler(sampler_config: dict) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler.from_config(sampler_config)


def set_timesteps(sampler: FlowMatchEulerDiscreteScheduler, steps: int, shapes: VideoShapes) -> torch.Tensor:
    """As HunyuanVideoPipeline: sigmas linspace(1, 0, steps + 1) without the last, shifted by the config."""
    sampler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    return sampler.timesteps


def sampler_config(weights: str | None, config: dict) -> dict:
    if weights is not None:
        path = Path(weights) / "scheduler" / "scheduler_config.json"
        if path.exists():
            return loading.config_kwargs(loading.read_json(path))
    return dict(SAMPLER_CONFIG)


def run_defaults(config: dict, sampler: dict) -> dict:
    return dict(DEFAULTS)


def unpack(latents: torch.Tensor, shapes: VideoShapes) -> torch.Tensor:
    """Latents [B, C, F, H, W] as they are (already unpatchified), in float32."""
    return latents.detach().float()


def video_frames(latents: torch.Tensor, shapes: VideoShapes) -> list[list[Image.Image]]:
    """Per video, its frames as images: the first three latent channels, contrast-stretched per video."""
    x = unpack(latents, shapes)[:, :3]
    lo = x.flatten(1).quantile(0.01, dim=1)[:, None, None, None, None]
    hi = x.flatten(1).quantile(0.99, dim=1)[:, None, None, None, None]
    x = ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    x = (x * 255).round().byte().permute(0, 2, 3, 4, 1).numpy()  # [B, F, H, W, 3]
    scale = max(1, 128 // max(x.shape[2], x.shape[3]))
    return [[Image.fromarray(frame).resize((frame.shape[1] * scale, frame.shape[0] * scale), Image.NEAREST)
             for frame in video] for video in x]


def preview(latents: torch.Tensor, shapes: VideoShapes) -> Image.Image:
    """A frame grid: one row per video, one column per latent frame."""
    videos = video_frames(latents, shapes)
    w, h = videos[0][0].size
    grid = Image.new("RGB", (w * len(videos[0]), h * len(videos)))
    for r, video in enumerate(videos):
        for c, frame in enumerate(video):
            grid.paste(frame, (c * w, r * h))
    return grid
