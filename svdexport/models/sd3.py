"""Stable Diffusion 3 and 3.5: diffusers' SD3Transformer2DModel split into the two graphs.

An MMDiT of joint blocks only: each block runs one attention over the image and text streams together,
then an MLP per stream; SD3.5 Medium's first blocks (MMDiT-X, `dual_attention_layers`) add a second,
image-only attention `attn2`, gated by the 9th chunk of their SD35AdaLayerNormZeroX modulation. The last
block is `context_pre_only` (it updates only the image stream). Cache sites ("block"): per joint block the
image attention output, `attn2`'s where the block has it, and the image MLP output, before their gates; the
cached step rebuilds the image stream from pos_embed(latents) (patches plus the position table) with the
shared gated rebuild of models/mmdit.py. "final": the image tokens entering norm_out.

What is SD3's own: latents [B, 16, H/8, W/8] unpatchified by the graphs, classifier-free guidance with
a negative prompt (the pipeline batches it: `SD3Prompts.batched_cfg`), the raw timestep (0..1000), the
sampler (shift 3), text of CLIP's 77 tokens then T5's. Single files: sd3_checkpoint.py; prompts:
sd3_prompts.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from svdexport.errors import SvdExportError
from svdexport.models import mmdit, preview, sd3_checkpoint
from svdexport.models.family import Conditioning, GraphContract, GraphInput, RunDefaults, Sampling, Shapes, axis
from svdexport.models.mmdit import BlockList, SiteRecorder, Site, rebuilt, split_sites
from svdexport.models.sd3_prompts import SD3Prompts
from svdexport.models.weights import WeightsInfo

BUNDLED_DIR = Path(__file__).parent / "bundled"
# stabilityai/stable-diffusion-3-medium-diffusers' scheduler/scheduler_config.json (3.5 Medium and Large: the same).
SAMPLER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}
# StableDiffusion3Pipeline's 28 steps; full steps 0, 1, 2, then every 4th: 9 of 28 (not tuned on SD3 weights).
DEFAULTS = RunDefaults(steps=28, warmup=3, interval=4)
VAE_SCALE = 8  # pixels per latent; the transformer's 2x2 patches make 16 pixels per token
JOINT = BlockList("joint", "transformer_blocks", "num_layers", "norm1", (
    Site("attn", "attn", 2),  # gate_msa (AdaLayerNormZero: shift, scale, gate of the attention, then of the MLP)
    Site("attn2", "attn2", 8, only_in="dual_attention_layers"),  # gate_msa2, the 9th of SD35AdaLayerNormZeroX's
    Site("ff", "ff", 5),  # gate_mlp
))


@dataclass
class SD3Shapes(Shapes):
    text_len: int = axis(64, "text tokens: CLIP's 77, then T5's (SD3's pipelines: 77 + 256 = 333)")


class SD3Sampling(Sampling):
    """StableDiffusion3Pipeline's rule: the scheduler's own timesteps for the step count (its shift; a
    resolution-dependent one when the config asks for it), the timestep passed as is (0..1000)."""

    def set_timesteps(self, scheduler, steps: int, shapes: Shapes) -> torch.Tensor:
        cfg, mu = scheduler.config, None
        if cfg.get("use_dynamic_shifting"):  # the pipeline's calculate_shift over the image tokens
            slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
            mu = shapes.img_tokens * slope + cfg.base_shift - slope * cfg.base_image_seq_len
        scheduler.set_timesteps(steps, mu=mu)
        return scheduler.timesteps

    def model_timestep(self, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return t.expand(latents.shape[0]).to(latents.device, latents.dtype).contiguous()


# ---------------------------------------------------------------------------------------------- graphs


class SD3FullGraph(nn.Module):
    """The unmodified transformer forward, returning also C and R of every cache site."""

    def __init__(self, transformer: nn.Module, granularity: str, family: mmdit.MMDiTFamily):
        super().__init__()
        self.transformer = transformer
        # No joined sequence: every site's output holds the image tokens only.
        self.recorder = SiteRecorder(family.site_hooks(transformer, granularity, lambda out: out))

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, bases):
        self.recorder.start()
        try:
            out = self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                   pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0]
        finally:
            features = self.recorder.stop()
        coeffs, residuals = split_sites(torch.stack(features), bases)
        return out, coeffs, residuals


class SD3CachedGraph(mmdit.CachedStepGraph):
    """Cached step: the image stream rebuilt (block) or reconstructed (final), then norm_out, proj_out and
    unpatchify to the latents' shape, which is why `hidden_states` is an input at both granularities."""

    def forward(self, hidden_states, timestep, pooled_projections, bases, coeffs, residuals):
        dtype = self.proj_out.weight.dtype
        temb = self.time_text_embed(timestep, pooled_projections)
        h = self.image_stream(hidden_states, temb, rebuilt(coeffs, residuals, bases, dtype))
        return unpatchify(self.proj_out(self.norm_out(h, temb)), hidden_states.shape)


def unpatchify(tokens: torch.Tensor, latent_shape, patch: int = 2) -> torch.Tensor:
    """proj_out's [B, tokens, p*p*C] back to latents [B, C, H, W], as the transformer's forward does."""
    b, _, h, w = latent_shape
    x = tokens.reshape(b, h // patch, w // patch, patch, patch, -1).permute(0, 5, 1, 3, 2, 4)  # nhwpqc->nchpwq
    return x.reshape(b, -1, h, w)


# ---------------------------------------------------------------------------------------------- inputs


def example_inputs(config: dict, shapes: Shapes, seed: int, dtype: torch.dtype = torch.float32,
                   conditioning: Conditioning | None = None) -> dict[str, torch.Tensor]:
    """Seeded noise latents and conditioning: `conditioning`'s rows (prompts encoded by the pipeline's text
    encoders), else seeded synthetic embeddings of the text encoders' widths."""
    most = config["pos_embed_max_size"] * config["patch_size"] * VAE_SCALE
    if max(shapes.height, shapes.width) > most:
        raise SvdExportError(f"{shapes.height}x{shapes.width} exceeds this model's position table: at most "
                             f"{most} pixels a side")
    g = torch.Generator().manual_seed(seed)
    b = shapes.batch
    latents = torch.randn(b, config["in_channels"], shapes.height // VAE_SCALE, shapes.width // VAE_SCALE, generator=g)
    enc, pooled = mmdit.text_rows(config, b, shapes.text_len, seed, g, conditioning)
    inputs = {"hidden_states": latents, "encoder_hidden_states": enc, "pooled_projections": pooled}
    return {k: v.to(dtype).contiguous() for k, v in inputs.items()}


# ---------------------------------------------------------------------------------------------- family


class SD3Family(mmdit.MMDiTFamily):
    name = "sd3"
    class_name = "SD3Transformer2DModel"
    shapes_type = SD3Shapes
    # "random": SD3.5 Medium's architecture (MMDiT-X: attn2 in the first 2 of 4 blocks, RMS qk-norm) at hidden
    # 128, seeded random weights.
    bundled = {"random": BUNDLED_DIR / "sd3_tiny.json"}
    default_weights = "bundled:random"
    pipeline_parts = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3",
                      "vae")
    default_sampler = SAMPLER_CONFIG
    prompts = SD3Prompts()  # CLIP-L, CLIP-G and T5 through StableDiffusion3Pipeline (sd3_prompts.py)
    lora_loader = "SD3LoraLoaderMixin"
    # diffusers' hooks know JointTransformerBlock (bench/peers.py lends the model their CacheMixin) and cache-dit
    # registers an SD3 adapter. Not FirstBlockCache: diffusers' hook subtracts the last block's context output,
    # which SD3's context_pre_only block does not return (TypeError on None, diffusers 0.42); nor cache-dit's
    # TaylorSeer calibrator, which asserts on SD3 ("State 'transformer_blocks_Bn_residual' not found", 1.5.3).
    peer_libraries = ("diffusers-taylorseer", "diffusers-magcache", "cachedit-dbcache")
    peer_refusals = {"diffusers-taylorseer lite": "diffusers' TaylorSeer lite mode forecasts every block output, and "
                     "SD3's last block returns no context (None: diffusers 0.42 fails on it)"}
    blocks = (JOINT,)
    latent_embedder = "pos_embed"  # PatchEmbed: the 2x2 patches projected, plus the cropped position table
    conditioning_inputs = (GraphInput("encoder_hidden_states", tokens=True), GraphInput("pooled_projections"))

    def inspect_file(self, path: Path) -> WeightsInfo:
        return sd3_checkpoint.inspect_file(path, self.transformer_class())

    def load_file(self, info: WeightsInfo, dtype: torch.dtype) -> mmdit.MappedWeights:
        return sd3_checkpoint.load_file(info, self.transformer_class(), dtype)

    def load_weights(self, info: WeightsInfo, dtype: torch.dtype) -> mmdit.MappedWeights:
        if info.config.get("patch_size", 2) != 2:  # 16 pixels per token (Shapes.pixels_per_token)
            raise SvdExportError(f"patch size {info.config['patch_size']} is not SD3's 2")
        return super().load_weights(info, dtype)

    def default_shapes(self, info: WeightsInfo) -> SD3Shapes:
        if info.shapes:
            return SD3Shapes(**info.shapes)
        if info.config["joint_attention_dim"] >= 4096:  # SD3 and SD3.5 at full size: their pipelines' defaults
            return SD3Shapes(height=1024, width=1024, text_len=333)
        return SD3Shapes()

    def contract(self, config: dict, granularity: str) -> GraphContract:
        return self.declare(["hidden_states", "timestep", "encoder_hidden_states", "pooled_projections", "bases"],
                            ["hidden_states", "timestep", "pooled_projections", "bases", "coeffs", "residuals"])

    def graphs(self, transformer: nn.Module, granularity: str) -> tuple[nn.Module, nn.Module]:
        contract = self.contract(dict(transformer.config), granularity)
        return (contract.bind(SD3FullGraph(transformer, granularity, self), "full"),
                contract.bind(SD3CachedGraph(transformer, granularity, self), "cached"))

    def sampling(self, sampler_config: dict) -> SD3Sampling:
        return SD3Sampling(sampler_config)

    def run_defaults(self, config: dict, sampler_config: dict) -> RunDefaults:
        return DEFAULTS

    def example_inputs(self, config: dict, shapes: Shapes, seed: int, dtype: torch.dtype = torch.float32,
                       conditioning: Conditioning | None = None) -> dict[str, torch.Tensor]:
        return example_inputs(config, shapes, seed, dtype=dtype, conditioning=conditioning)

    def forward_kwargs(self, inputs: dict[str, torch.Tensor], timestep: torch.Tensor) -> dict:
        return {"hidden_states": inputs["hidden_states"], "timestep": timestep,
                "encoder_hidden_states": inputs["encoder_hidden_states"],
                "pooled_projections": inputs["pooled_projections"], "return_dict": False}

    def unpack(self, latents: torch.Tensor, shapes: Shapes) -> torch.Tensor:
        """Latents [B, C, H/8, W/8] as they are (the graphs unpatchify), in float32."""
        return latents.detach().float()

    def preview(self, latents: torch.Tensor, shapes: Shapes):
        return preview.image_strip(self.unpack(latents, shapes))


SD3 = SD3Family()
