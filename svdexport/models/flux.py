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

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from typing import TYPE_CHECKING

from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image
from torch import nn

from svdexport.cache.svd import reconstruct
from svdexport.errors import SvdExportError
from svdexport.models.base import SiteRecorder, WeightsInfo, split_sites
from svdexport.runtime.files import sha256_state_dict

if TYPE_CHECKING:
    from diffusers import FluxTransformer2DModel

# The transformer class is imported only where a model is built: compiled engines (aoti, onnx) run
# without the model's Python code.


def _transformer_class():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel

NAME = "flux"
DEFAULT_CACHE = {"warmup": 3, "interval": 7}  # TaylorSeer's FLUX schedule; 50 steps -> 9 full steps
PIXELS_PER_TOKEN = 16  # VAE downsampling 8 x 2x2 latent packing
BUNDLED_DIR = Path(__file__).parent / "bundled"
# Bundled models, selected with --weights bundled:NAME. "digits" (trained by scripts/train_reference_flux.py,
# class-conditioned, 64 image tokens) is the default; "random" is seeded random weights at 1024 image
# tokens, for latency work at a FLUX-like sequence length.
BUNDLED = {"digits": BUNDLED_DIR / "flux_digits", "random": BUNDLED_DIR / "flux_tiny.json"}
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


@dataclass
class FluxShapes:
    batch: int = 1  # images per call
    height: int = 512  # image height in pixels (16 pixels per latent token side)
    width: int = 512  # image width in pixels
    text_len: int = 64  # text tokens (512 for FLUX.1-dev, 256 for schnell; 64 for the bundled model)

    def validate(self) -> "FluxShapes":
        for name in ("height", "width"):
            v = getattr(self, name)
            if v < PIXELS_PER_TOKEN or v % PIXELS_PER_TOKEN:
                raise SvdExportError(f"{name}={v} must be a positive multiple of {PIXELS_PER_TOKEN}")
        if self.batch < 1 or self.text_len < 1:
            raise SvdExportError(f"batch and text_len must be >= 1, got {self.batch} and {self.text_len}")
        return self

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // PIXELS_PER_TOKEN, self.width // PIXELS_PER_TOKEN

    @property
    def img_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


# ---------------------------------------------------------------------------------------------- loading


def _config_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _bundled_random() -> tuple[FluxTransformer2DModel, WeightsInfo]:
    # Random weights from a fixed seed: small enough to regenerate, so no binary is committed.
    spec = json.loads(BUNDLED["random"].read_text())
    torch.manual_seed(spec["seed"])
    model = _transformer_class()(**spec["config"])
    info = WeightsInfo("bundled:random", dict(model.config), sha256=sha256_state_dict(model.state_dict()))
    return model, info


def _bundled(name: str, dtype: torch.dtype) -> tuple[FluxTransformer2DModel, WeightsInfo]:
    if name not in BUNDLED:
        raise SvdExportError(f"unknown bundled model {name!r} (choose from {', '.join(BUNDLED)})")
    if name == "random":
        model, info = _bundled_random()
        if dtype != torch.float32:  # built in float32; .to(float32) would only print a diffusers warning
            model = model.to(dtype)
        return model, info
    model, info = _from_folder(BUNDLED[name], dtype)
    info.source = f"bundled:{name}"
    return model, info


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SvdExportError(f"malformed config {path}: {e}") from None


def _check_class(config: dict, where: Path) -> None:
    cls = config.get("_class_name", "FluxTransformer2DModel")
    if cls != "FluxTransformer2DModel":
        raise SvdExportError(f"{where} holds a {cls}, not a FluxTransformer2DModel")


def _from_folder(root: Path, dtype: torch.dtype) -> tuple[FluxTransformer2DModel, WeightsInfo]:
    folder = root / "transformer" if (root / "transformer" / "config.json").exists() else root
    if not (folder / "config.json").exists():
        raise SvdExportError(f"{root} has no transformer (expected config.json or transformer/config.json)")
    config = _read_json(folder / "config.json")
    _check_class(config, folder / "config.json")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SvdExportError(f"{folder} has no .safetensors weights")
    try:
        model, report = _transformer_class().from_pretrained(folder, torch_dtype=dtype, local_files_only=True,
                                                               output_loading_info=True)
    except Exception as e:  # diffusers raises several types for bad or mismatched checkpoints
        raise SvdExportError(f"cannot load FLUX weights from {folder}: {str(e).splitlines()[0]}") from None
    # diffusers only warns about missing or extra tensors (and fills gaps randomly): refuse instead.
    problems = {k: v for k, v in report.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        kind, keys = next(iter(problems.items()))
        raise SvdExportError(f"cannot load FLUX weights from {folder}: config and weights disagree "
                             f"({len(keys)} {kind.replace('_', ' ')}, e.g. {keys[0]})")
    parts = [p for p in ("text_encoder", "text_encoder_2", "vae") if (root / p).is_dir()]
    info = WeightsInfo(str(root.resolve()), dict(model.config), [str(f.resolve()) for f in files], parts)
    meta_path = root / "svdexport.json"  # written by scripts/train_reference_flux.py beside its model
    if meta_path.exists():
        meta = _read_json(meta_path)
        cond = meta.get("conditioning", {})
        if cond.get("kind") == "class-table":
            table = root / cond["file"]
            info.conditioning = {"kind": "class-table", "file": str(table.resolve()), "labels": cond["labels"]}
            info.files.append(str(table.resolve()))  # the table is part of the model's identity
        info.shapes = meta.get("shapes")
    return model, info


def _infer_config(state: dict[str, torch.Tensor]) -> dict:
    """A diffusers config from the tensor shapes of a diffusers-format FLUX state dict."""

    def count(prefix: str) -> int:
        return len({k.split(".")[1] for k in state if k.startswith(prefix + ".")})

    try:
        inner, in_channels = state["x_embedder.weight"].shape
        head_dim = state["transformer_blocks.0.attn.norm_q.weight"].shape[0]
        config = {
            "in_channels": in_channels,
            "num_layers": count("transformer_blocks"),
            "num_single_layers": count("single_transformer_blocks"),
            "attention_head_dim": head_dim,
            "num_attention_heads": inner // head_dim,
            "joint_attention_dim": state["context_embedder.weight"].shape[1],
            "pooled_projection_dim": state["time_text_embed.text_embedder.linear_1.weight"].shape[1],
            "guidance_embeds": any(k.startswith("time_text_embed.guidance_embedder.") for k in state),
        }
    except KeyError as e:
        raise SvdExportError(f"not a FLUX transformer checkpoint (missing {e.args[0]})") from None
    if head_dim != 128:
        raise SvdExportError(
            f"cannot infer axes_dims_rope for head dim {head_dim}; put the transformer's config.json beside the file"
        )
    return config


def _from_file(path: Path, dtype: torch.dtype) -> tuple[FluxTransformer2DModel, WeightsInfo]:
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as e:
        raise SvdExportError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if any(k.startswith(("double_blocks.", "model.diffusion_model.")) for k in state):
        # Black Forest Labs' original layout: diffusers' own converter maps it to diffusers names.
        from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

        try:
            state = convert_flux_transformer_checkpoint_to_diffusers(state)
        except (KeyError, IndexError) as e:
            raise SvdExportError(f"{path} is not a FLUX transformer checkpoint ({e})") from None
    beside = path.parent / "config.json"
    if beside.exists():
        config = _read_json(beside)
        _check_class(config, beside)
        config = _config_kwargs(config)
    else:
        config = _infer_config(state)
    try:
        model = _transformer_class()(**config)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as e:
        raise SvdExportError(f"weights in {path} do not match their config: {str(e).splitlines()[0]}") from None
    if dtype != torch.float32:
        model = model.to(dtype)
    return model, WeightsInfo(str(path.resolve()), dict(model.config), [str(path.resolve())])


def load(weights: str | None, dtype: torch.dtype = torch.float32) -> tuple[FluxTransformer2DModel, WeightsInfo]:
    """The real diffusers transformer: bundled (None or "bundled:NAME"), a diffusers folder, or one
    .safetensors file."""
    weights = DEFAULT_WEIGHTS if weights in (None, "bundled") else weights
    if weights.startswith("bundled:"):
        model, info = _bundled(weights.split(":", 1)[1], dtype)
    else:
        path = Path(weights)
        if not path.exists():
            raise SvdExportError(f"weights not found: {path}")
        if path.is_dir():
            model, info = _from_folder(path, dtype)
        elif path.suffix == ".safetensors":
            model, info = _from_file(path, dtype)
        else:
            raise SvdExportError(f"weights must be a diffusers folder or a .safetensors file, got {path}")
    return model.eval().requires_grad_(False), info


# ----------------------------------------------------------------------------------------------- graphs


def sites(config: dict, granularity: str) -> list[str]:
    """Cache-site names in the order the graphs stack them."""
    if granularity == "final":
        return ["final"]
    double = [f"double.{i}.{part}" for i in range(config["num_layers"]) for part in ("attn", "ff")]
    return double + [f"single.{i}" for i in range(config["num_single_layers"])]


def hidden_size(config: dict) -> int:
    return config["num_attention_heads"] * config["attention_head_dim"]


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
        if granularity == "final":
            hooks = [(transformer.norm_out, lambda args, out: args[0], True)]
        else:
            hooks = []
            for block in transformer.transformer_blocks:
                hooks.append((block.attn, lambda args, out: out[0], False))  # (image, context) outputs
                hooks.append((block.ff, lambda args, out: out, False))
            for block in transformer.single_transformer_blocks:
                hooks.append((block.proj_out, lambda args, out: out[:, self.text_len :], False))
        self.recorder = SiteRecorder(hooks)
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


class FluxBlockCachedGraph(nn.Module):
    """Cached step at block granularity: embedded latents + gate x reconstructed feature, per site.

    Holds only the embedders, the blocks' modulation layers (for the gates) and the output head: none of
    the attention or MLP weights it skips.
    """

    def __init__(self, transformer: FluxTransformer2DModel):
        super().__init__()
        self.x_embedder = transformer.x_embedder
        self.time_text_embed = transformer.time_text_embed
        self.double_norms = nn.ModuleList(b.norm1 for b in transformer.transformer_blocks)
        self.single_norms = nn.ModuleList(b.norm for b in transformer.single_transformer_blocks)
        self.norm_out = transformer.norm_out
        self.proj_out = transformer.proj_out
        guidance = ["guidance"] if transformer.config.guidance_embeds else []
        self.input_names = ["hidden_states", "timestep", "pooled_projections", "bases", "coeffs", "residuals"] + guidance
        self.output_names = ["noise_pred"]

    def forward(self, hidden_states, timestep, pooled_projections, bases, coeffs, residuals, guidance=None):
        h = self.x_embedder(hidden_states)
        temb = _time_embedding(self.time_text_embed, timestep, pooled_projections, guidance, h.dtype)
        features = reconstruct(coeffs, residuals, bases.to(h.dtype))
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
        return self.proj_out(self.norm_out(h, temb))


class FluxFinalCachedGraph(nn.Module):
    """Cached step at final granularity: norm_out + proj_out of the reconstructed last hidden state."""

    def __init__(self, transformer: FluxTransformer2DModel):
        super().__init__()
        self.time_text_embed = transformer.time_text_embed
        self.norm_out = transformer.norm_out
        self.proj_out = transformer.proj_out
        guidance = ["guidance"] if transformer.config.guidance_embeds else []
        self.input_names = ["timestep", "pooled_projections", "bases", "coeffs", "residuals"] + guidance
        self.output_names = ["noise_pred"]

    def forward(self, timestep, pooled_projections, bases, coeffs, residuals, guidance=None):
        dtype = self.proj_out.weight.dtype
        temb = _time_embedding(self.time_text_embed, timestep, pooled_projections, guidance, dtype)
        h = reconstruct(coeffs, residuals, bases.to(dtype))[0]
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


def sampler_config(weights: str | None) -> dict:
    """The scheduler config beside the weights when a pipeline folder has one, else FLUX.1's."""
    if weights is not None:
        path = Path(weights) / "scheduler" / "scheduler_config.json"
        if path.exists():
            return _config_kwargs(_read_json(path))
    return dict(SAMPLER_CONFIG)


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
    if info.config["joint_attention_dim"] >= 4096:
        return FluxShapes(height=1024, width=1024, text_len=512)
    return FluxShapes()


Shapes = FluxShapes  # the name the family-agnostic code uses
