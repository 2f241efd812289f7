"""FLUX.1 adapter: diffusers' FluxTransformer2DModel split into a full-compute and a cached-step graph.

Cache sites (see REFERENCE.md section 3):
- granularity "block": per double-stream block the image attention output and the image MLP output,
  per single-stream block the proj_out output on image tokens, all before their gates. A cached step
  rebuilds the image stream as x_embedder(latents) + sum(current gate x reconstructed feature), which
  equals the real forward exactly when the features are exact.
- granularity "final": the image tokens' hidden state entering norm_out; a cached step is
  norm_out + proj_out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image
from torch import nn
from tqdm import tqdm

from svdexport.cache.svd import reconstruct
from svdexport.errors import SvdExportError
from svdexport.models import base, loading
from svdexport.models.base import SiteRecorder, WeightsInfo, from_pretrained, split_sites
from svdexport.models.loading import read_prompts  # noqa: F401  (part of the family interface)
from svdexport.runtime.scheduler import per_mille

if TYPE_CHECKING:
    from diffusers import FluxTransformer2DModel

# The transformer class is imported only where a model is built: compiled engines (aoti, onnx) run
# without the model's Python code.


def _transformer_class():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel

NAME = "flux"
CLASS_NAME = "FluxTransformer2DModel"
# Steps per image and schedule when the user gives none. dev: TaylorSeer's FLUX schedule, 9 full steps of
# 50. schnell (timestep-distilled, no guidance input): 4 steps, full / cached / full / cached.
DEV = {"steps": 50, "warmup": 3, "interval": 7}
SCHNELL = {"steps": 4, "warmup": 1, "interval": 2}
PIXELS_PER_TOKEN = 16  # VAE downsampling 8 x 2x2 latent packing
BUNDLED_DIR = Path(__file__).parent / "bundled"
# Bundled models, selected with --weights bundled:NAME. "digits" (trained by scripts/train_reference_flux.py,
# class-conditioned, 64 image tokens) is the default; "random" is seeded random weights at 1024 image
# tokens, for latency work at a FLUX-like sequence length.
# "flux1-reduced" is FLUX.1-dev's full width (hidden 3072, 24 heads, joint attention 4096) at 2 double +
# 2 single blocks, seeded random weights: the real-size export path on a machine without 24 GB to spare.
BUNDLED = {"digits": BUNDLED_DIR / "flux_digits", "random": BUNDLED_DIR / "flux_tiny.json",
           "flux1-reduced": BUNDLED_DIR / "flux1_reduced.json"}
PIPELINE_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")
DEFAULT_WEIGHTS = "bundled:digits"

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


@dataclass
class FluxShapes:
    batch: int = 1  # images per call
    height: int = 512  # image height in pixels (16 pixels per latent token side)
    width: int = 512  # image width in pixels
    text_len: int = 64  # text tokens (512 for FLUX.1-dev, 256 for schnell; 64 for the bundled model)

    def validate(self) -> "FluxShapes":
        base.check_shapes(self, PIXELS_PER_TOKEN)
        return self

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // PIXELS_PER_TOKEN, self.width // PIXELS_PER_TOKEN

    @property
    def img_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


# ---------------------------------------------------------------------------------------------- loading


def _header_shapes(path: Path) -> dict[str, tuple]:
    """Tensor names and shapes of a .safetensors file, from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise SvdExportError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def _is_bfl(names) -> bool:
    return any(k.startswith(("double_blocks.", "model.diffusion_model.")) for k in names)


def _infer_config(shapes: dict[str, tuple]) -> dict:
    """A diffusers config from the tensor shapes of a FLUX checkpoint (diffusers or BFL names)."""

    def count(prefix: str) -> int:
        return len({k[len(prefix) + 1:].split(".")[0] for k in shapes if k.startswith(prefix + ".")})

    bfl = _is_bfl(shapes)
    pre = "model.diffusion_model." if any(k.startswith("model.diffusion_model.") for k in shapes) else ""
    n = ({"x": "img_in.weight", "head": "double_blocks.0.img_attn.norm.query_norm.scale", "txt": "txt_in.weight",
          "pooled": "vector_in.in_layer.weight", "double": "double_blocks", "single": "single_blocks",
          "guidance": "guidance_in."} if bfl else
         {"x": "x_embedder.weight", "head": "transformer_blocks.0.attn.norm_q.weight",
          "txt": "context_embedder.weight", "pooled": "time_text_embed.text_embedder.linear_1.weight",
          "double": "transformer_blocks", "single": "single_transformer_blocks",
          "guidance": "time_text_embed.guidance_embedder."})
    n = {k: pre + v for k, v in n.items()}
    try:
        inner, in_channels = shapes[n["x"]]
        head_dim = shapes[n["head"]][0]
        config = {
            "in_channels": in_channels,
            "num_layers": count(n["double"]),
            "num_single_layers": count(n["single"]),
            "attention_head_dim": head_dim,
            "num_attention_heads": inner // head_dim,
            "joint_attention_dim": shapes[n["txt"]][1],
            "pooled_projection_dim": shapes[n["pooled"]][1],
            "guidance_embeds": any(k.startswith(n["guidance"]) for k in shapes),
        }
    except KeyError as e:
        raise SvdExportError(f"not a FLUX transformer checkpoint (missing {e.args[0]})") from None
    if head_dim != 128:
        raise SvdExportError(
            f"cannot infer axes_dims_rope for head dim {head_dim}; put the transformer's config.json beside the file"
        )
    return config


def _inspect_file(path: Path) -> WeightsInfo:
    beside = path.parent / "config.json"
    if beside.exists():
        config = loading.read_json(beside)
        loading.check_class(config, beside, CLASS_NAME)
        config = loading.config_kwargs(config)
    else:
        config = _infer_config(_header_shapes(path))
    try:
        with torch.device("meta"):  # fills in the class defaults (e.g. axes_dims_rope) without allocating
            config = dict(_transformer_class().from_config(config).config)
    except TypeError as e:
        raise SvdExportError(f"bad transformer config for {path}: {e}") from None
    return WeightsInfo(str(path.resolve()), loading.config_kwargs(config), [str(path.resolve())])


def inspect(weights: str | None) -> WeightsInfo:
    """What the weights are (config, files, pipeline parts, conditioning) without loading any tensor: a
    build checks shapes and memory against it before the long work."""
    found = loading.inspect_weights(weights, DEFAULT_WEIGHTS, BUNDLED, CLASS_NAME, PIPELINE_PARTS)
    if isinstance(found, WeightsInfo):
        return found
    path = found
    if path.suffix != ".safetensors":
        raise SvdExportError(f"weights must be a diffusers folder or a .safetensors file, got {path}")
    return _inspect_file(path)


def _load_file(info: WeightsInfo, dtype: torch.dtype) -> FluxTransformer2DModel:
    from safetensors.torch import load_file

    path = Path(info.source)
    try:
        state = load_file(str(path))
    except Exception as e:
        raise SvdExportError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if _is_bfl(state):
        # Black Forest Labs' original layout: diffusers' own converter maps it to diffusers names.
        from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

        try:
            state = convert_flux_transformer_checkpoint_to_diffusers(state)
        except (KeyError, IndexError) as e:
            raise SvdExportError(f"{path} is not a FLUX transformer checkpoint ({e})") from None
    try:
        with torch.device("meta"):
            model = _transformer_class().from_config(info.config)
        model.load_state_dict(state, strict=True, assign=True)  # takes the loaded tensors, no second copy
    except (RuntimeError, TypeError) as e:
        raise SvdExportError(f"weights in {path} do not match their config: {str(e).splitlines()[0]}") from None
    return loading.cast(model, dtype)


def load(weights: str | None, dtype: torch.dtype = torch.float32,
         info: WeightsInfo | None = None) -> tuple[FluxTransformer2DModel, WeightsInfo]:
    """The real diffusers transformer: bundled (None or "bundled:NAME"), a diffusers folder, or one
    .safetensors file. `info` is `inspect(weights)` when the caller already has it."""
    info = info or inspect(weights)
    if info.source.startswith("bundled:") and not info.files:
        model = loading.generated(_transformer_class(), BUNDLED[info.source.split(":", 1)[1]], info, dtype)
    elif Path(info.source).is_file():
        model = _load_file(info, dtype)
    else:
        model = loading.load_folder(_transformer_class(), info, dtype)
    return model.eval().requires_grad_(False), info


def parameters(config: dict) -> int:
    return loading.count_parameters(_transformer_class(), config)


def activation_bytes(config: dict, shapes: FluxShapes, itemsize: int) -> int:
    """Largest activations of one full step: the attention scores of one layer (float32 softmax, as the
    math fallback of CPU attention keeps them) and a few hidden-state buffers."""
    tokens = shapes.img_tokens + shapes.text_len
    scores = shapes.batch * config["num_attention_heads"] * tokens * tokens * 4 * 2
    hidden = shapes.batch * tokens * hidden_size(config) * itemsize * 16
    return scores + hidden


# ----------------------------------------------------------------------------------------------- graphs


sites, hidden_size = base.sites, base.hidden_size


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

    def __init__(self, transformer: FluxTransformer2DModel, granularity: str):
        super().__init__()
        self.transformer = transformer
        self.text_len = 0  # set per call; single-stream sites keep the image tokens after the text
        # Single-stream blocks join (text, image): the image tokens come after the text.
        self.recorder = SiteRecorder(base.site_hooks(transformer, granularity, lambda out: out[:, self.text_len :]))
        self.given_rotary = _GivenRotary()
        guidance = ["guidance"] if transformer.config.guidance_embeds else []
        self.input_names = ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                            "rotary_cos", "rotary_sin", "bases"] + guidance
        self.output_names = ["noise_pred", "coeffs", "residuals"]

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
        coeffs, residuals = split_sites(features, bases)
        return out, coeffs, residuals


class FluxBlockCachedGraph(base.CachedStepGraph):
    """Cached step at block granularity: embedded latents + gate x reconstructed feature, per site."""

    def __init__(self, transformer: FluxTransformer2DModel):
        super().__init__(transformer, "block")

    def forward(self, hidden_states, timestep, pooled_projections, bases, coeffs, residuals, guidance=None):
        dtype = self.proj_out.weight.dtype
        temb = _time_embedding(self.time_text_embed, timestep, pooled_projections, guidance, dtype)
        h = self.image_stream(hidden_states, temb, reconstruct(coeffs, residuals, bases.to(dtype)))
        return self.proj_out(self.norm_out(h, temb))


class FluxFinalCachedGraph(base.CachedStepGraph):
    """Cached step at final granularity: norm_out + proj_out of the reconstructed last hidden state."""

    def __init__(self, transformer: FluxTransformer2DModel):
        super().__init__(transformer, "final")

    def forward(self, timestep, pooled_projections, bases, coeffs, residuals, guidance=None):
        dtype = self.proj_out.weight.dtype
        temb = _time_embedding(self.time_text_embed, timestep, pooled_projections, guidance, dtype)
        h = self.image_stream(None, temb, reconstruct(coeffs, residuals, bases.to(dtype)))
        return self.proj_out(self.norm_out(h, temb))


def graphs(transformer: FluxTransformer2DModel, granularity: str) -> tuple[nn.Module, nn.Module]:
    """(full-compute graph, cached-step graph); both share the transformer's parameters."""
    cached = FluxFinalCachedGraph(transformer) if granularity == "final" else FluxBlockCachedGraph(transformer)
    return FluxFullGraph(transformer, granularity), cached


# ------------------------------------------------------------------------------------ inputs and sampler


def _image_ids(shapes: FluxShapes) -> torch.Tensor:
    # As FluxPipeline._prepare_latent_image_ids: (0, row, col) per latent token.
    h, w = shapes.grid
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


def example_inputs(config: dict, shapes: FluxShapes, seed: int, guidance_scale: float = 3.5,
                   dtype: torch.dtype = torch.float32, table: dict | None = None,
                   labels: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Seeded noise latents and conditioning of the transformer's shapes.

    With a class table (the bundled digits model) the conditioning is the table's rows for `labels`
    (default: classes seed, seed+1, ... modulo the number of classes); otherwise it is seeded synthetic
    embeddings standing in for the text encoders.
    """
    g = torch.Generator().manual_seed(seed)
    b = shapes.batch
    latents = torch.randn(b, shapes.img_tokens, config["in_channels"], generator=g)
    if table is None:
        enc = torch.randn(b, shapes.text_len, config["joint_attention_dim"], generator=g)
        pooled = torch.randn(b, config["pooled_projection_dim"], generator=g)
    else:
        classes = table["pooled_projections"].shape[0]
        labels = [(seed + i) % classes for i in range(b)] if labels is None else list(labels)
        if len(labels) != b or not all(0 <= y < classes for y in labels):
            raise SvdExportError(f"labels must be {b} class indices in [0, {classes}), got {labels}")
        enc, pooled = table["encoder_hidden_states"][labels], table["pooled_projections"][labels]
    inputs = {"hidden_states": latents, "encoder_hidden_states": enc, "pooled_projections": pooled}
    inputs = {k: v.to(dtype) for k, v in inputs.items()}
    inputs["img_ids"] = _image_ids(shapes)
    inputs["txt_ids"] = torch.zeros(shapes.text_len, 3)
    inputs["rotary_cos"], inputs["rotary_sin"] = rotary(config, inputs["txt_ids"], inputs["img_ids"])
    if config.get("guidance_embeds"):
        inputs["guidance"] = torch.full((b,), guidance_scale, dtype=torch.float32)
    return inputs


def call_inputs(config: dict, kwargs: dict, memo: dict) -> dict[str, torch.Tensor]:
    """Graph inputs from the keyword arguments FluxPipeline passes to FluxTransformer2DModel.forward.

    `memo` keeps the rotary table between calls: the position ids are the same at every step.
    """
    img_ids, txt_ids = (kwargs[k][0] if kwargs[k].ndim == 3 else kwargs[k] for k in ("img_ids", "txt_ids"))
    old = memo.get("ids")
    if old is None or not (torch.equal(old[0], txt_ids) and torch.equal(old[1], img_ids)):
        memo["ids"], memo["rotary"] = (txt_ids.clone(), img_ids.clone()), rotary(config, txt_ids, img_ids)
    inputs = {k: kwargs[k] for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")}
    inputs.update(img_ids=img_ids, txt_ids=txt_ids, rotary_cos=memo["rotary"][0], rotary_sin=memo["rotary"][1])
    if config.get("guidance_embeds"):
        if kwargs.get("guidance") is None:
            raise SvdExportError("this engine's model is guidance-distilled (FLUX.1-dev) and needs a guidance scale")
        inputs["guidance"] = kwargs["guidance"].float()
    return inputs


TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def has_text_encoders(info: WeightsInfo) -> bool:
    return all(p in info.pipeline_parts for p in TEXT_PARTS)


@torch.inference_mode()
def encode_prompts(info: WeightsInfo, prompts: list[str], text_len: int, dtype: torch.dtype,
                   device: str) -> dict[str, torch.Tensor]:
    """Per prompt, encoder_hidden_states and pooled_projections from the pipeline folder's own text
    encoders (FluxPipeline.encode_prompt); the encoders are freed when it returns."""
    from diffusers import FluxPipeline

    try:
        pipe = from_pretrained(FluxPipeline, info.source, dtype, transformer=None, vae=None).to(device)
    except Exception as e:
        raise SvdExportError(f"cannot load the text encoders of {info.source}: {str(e).splitlines()[0]}") from None
    rows = [pipe.encode_prompt(prompt=p, prompt_2=None, device=device, max_sequence_length=text_len)[:2]
            for p in tqdm(prompts, desc="encoding prompts", unit="prompt", leave=False)]
    return {"encoder_hidden_states": torch.cat([e for e, _ in rows]).cpu(),
            "pooled_projections": torch.cat([p for _, p in rows]).cpu()}


def load_table(path: str | Path) -> dict[str, torch.Tensor]:
    """The class-conditioning table of a model or engine: per class, encoder_hidden_states and pooled_projections."""
    from safetensors.torch import load_file

    return load_file(str(path))


def _shift(image_tokens: int, cfg) -> float:
    # FLUX's resolution-dependent shift: mu linear in the image token count (FluxPipeline's calculate_shift).
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return image_tokens * slope + cfg.base_shift - slope * cfg.base_image_seq_len


def make_sampler(sampler_config: dict) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler.from_config(sampler_config)


def set_timesteps(sampler: FlowMatchEulerDiscreteScheduler, steps: int, shapes: FluxShapes) -> torch.Tensor:
    """Resets the sampler to `steps` FLUX timesteps (as FluxPipeline sets them) and returns them."""
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = _shift(shapes.img_tokens, sampler.config) if sampler.config.use_dynamic_shifting else None
    sampler.set_timesteps(sigmas=sigmas, mu=mu)
    return sampler.timesteps


def sampler_config(weights: str | None, config: dict) -> dict:
    """The scheduler config beside the weights when a pipeline folder has one, else FLUX.1-dev's, or
    schnell's for a full-width transformer without a guidance embedder."""
    if weights is not None:
        path = Path(weights) / "scheduler" / "scheduler_config.json"
        if path.exists():
            return loading.config_kwargs(loading.read_json(path))
    schnell = not config.get("guidance_embeds") and config["joint_attention_dim"] >= 4096
    return dict(SCHNELL_SAMPLER_CONFIG if schnell else SAMPLER_CONFIG)


def run_defaults(config: dict, sampler: dict) -> dict:
    """Steps, warmup and interval for this model: schnell's for a model without guidance input whose
    sampler has no resolution shift (FLUX.1-schnell), else dev's."""
    schnell = not config.get("guidance_embeds") and not sampler.get("use_dynamic_shifting", True)
    return dict(SCHNELL if schnell else DEV)


model_timestep = per_mille  # FluxPipeline passes t / 1000 in the latents' dtype


def unpack(latents: torch.Tensor, shapes: FluxShapes) -> torch.Tensor:
    """Packed latents [B, N, C*4] -> [B, C, 2h, 2w] (FluxPipeline's _unpack_latents, before the VAE)."""
    b, n, c4 = latents.shape
    h, w = shapes.grid
    x = latents.detach().float().reshape(b, h, w, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def preview(latents: torch.Tensor, shapes: FluxShapes) -> Image.Image:
    """PNG preview of packed latents [B, N, C*4]: first three latent channels, per-image contrast stretch."""
    x = unpack(latents, shapes)[:, :3]
    if x.shape[1] < 3:
        x = x[:, :1].expand(-1, 3, -1, -1)
    lo = x.flatten(1).quantile(0.01, dim=1)[:, None, None, None]
    hi = x.flatten(1).quantile(0.99, dim=1)[:, None, None, None]
    x = ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    tiles = (x * 255).round().byte().permute(0, 2, 3, 1).numpy()
    scale = max(1, 256 // max(tiles.shape[1], tiles.shape[2]))
    strip = np.concatenate(list(tiles), axis=1)
    img = Image.fromarray(strip)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def default_shapes(info: WeightsInfo) -> FluxShapes:
    # The model's own (bundled models say theirs); FLUX.1 at full width: 1024x1024 and 512 text tokens.
    if info.shapes:
        return FluxShapes(**info.shapes)
    if info.config["joint_attention_dim"] >= 4096:  # schnell's text encoder takes 256 tokens, dev's 512
        return FluxShapes(height=1024, width=1024, text_len=512 if info.config.get("guidance_embeds") else 256)
    return FluxShapes()


Shapes = FluxShapes  # the name the family-agnostic code uses
