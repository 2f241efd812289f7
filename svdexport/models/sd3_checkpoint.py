"""SD3 single-file checkpoints: diffusers' layout (a transformer's diffusion_pytorch_model.safetensors) or
Stability AI's original one (`joint_blocks.*`, under `model.diffusion_model.` in files that also hold the VAE
and text encoders, which are skipped). The config comes from config.json beside the file, else from the
tensor shapes; the original layout is converted by diffusers' own converter, keeping views of the mapped file."""

from __future__ import annotations

from pathlib import Path

import torch

from svdexport.errors import SvdExportError
from svdexport.models import weights as wt
from svdexport.models.mapped import MappedWeights, SingleCatAsView, header_shapes, load_mapped
from svdexport.models.weights import WeightsInfo

PREFIX = "model.diffusion_model."  # the transformer's keys in Stability's all-in-one files
HEAD_DIM = 64  # every SD3 and SD3.5 release; read from the qk-norm weights where a model has them


def is_original(names) -> bool:
    return any(k.startswith(("joint_blocks.", PREFIX)) for k in names)


def infer_config(shapes: dict[str, tuple]) -> dict:
    """A diffusers config from the tensor shapes of an SD3 checkpoint (either layout)."""
    original = is_original(shapes)
    pre = PREFIX if any(k.startswith(PREFIX) for k in shapes) else ""
    n = ({"x": "x_embedder.proj.weight", "pos": "pos_embed", "blocks": "joint_blocks",
          "pooled": "y_embedder.mlp.0.weight", "out": "final_layer.linear.weight", "dual": ".x_block.attn2.",
          "qk": "joint_blocks.0.x_block.attn.ln_q.weight"} if original else
         {"x": "pos_embed.proj.weight", "pos": "pos_embed.pos_embed", "blocks": "transformer_blocks",
          "pooled": "time_text_embed.text_embedder.linear_1.weight", "out": "proj_out.weight", "dual": ".attn2.",
          "qk": "transformer_blocks.0.attn.norm_q.weight"})
    n = {k: v if k == "dual" else pre + v for k, v in n.items()}
    blocks = {int(k[len(n["blocks"]) + 1:].split(".")[0]) for k in shapes if k.startswith(n["blocks"] + ".")}
    try:
        inner, in_channels, patch, _ = shapes[n["x"]]
        context = shapes[pre + "context_embedder.weight"]
        head_dim = shapes[n["qk"]][0] if n["qk"] in shapes else HEAD_DIM
        config = {
            "patch_size": patch, "in_channels": in_channels, "num_layers": len(blocks),
            "attention_head_dim": head_dim, "num_attention_heads": inner // head_dim,
            "joint_attention_dim": context[1], "caption_projection_dim": context[0],
            "pooled_projection_dim": shapes[n["pooled"]][1], "out_channels": shapes[n["out"]][0] // (patch * patch),
            "pos_embed_max_size": round(shapes[n["pos"]][1] ** 0.5),
            "dual_attention_layers": sorted({i for i in blocks if any(k.startswith(f"{n['blocks']}.{i}{n['dual']}")
                                                                       for k in shapes)}),
            "qk_norm": "rms_norm" if n["qk"] in shapes else None,
        }
    except (KeyError, ValueError) as e:
        raise SvdExportError(f"not an SD3 transformer checkpoint (missing {e.args[0]})") from None
    if not blocks or inner % head_dim:
        raise SvdExportError("cannot infer the SD3 config of this checkpoint; put the transformer's config.json "
                             "beside the file")
    return config


def inspect_file(path: Path, cls) -> WeightsInfo:
    """A .safetensors SD3 transformer: its config from config.json beside it, else from its tensor shapes."""
    return wt.inspect_file(path, cls, lambda: infer_config(header_shapes(path)))


def to_diffusers(state: dict, path: Path) -> dict:
    """The original layout converted by diffusers' converter (diffusers' names pass as they are); the VAE's
    and text encoders' tensors of an all-in-one file are left out."""
    if not is_original(state):
        return state
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    pre = PREFIX if any(k.startswith(PREFIX) for k in state) else ""
    own = {k[len(pre):]: v for k, v in state.items() if k.startswith(pre)}
    try:
        with SingleCatAsView():
            return convert_sd3_transformer_checkpoint_to_diffusers(own)
    except (KeyError, IndexError) as e:
        raise SvdExportError(f"{path} is not an SD3 transformer checkpoint ({e})") from None


def load_file(info: WeightsInfo, cls, dtype: torch.dtype) -> MappedWeights:
    """The transformer from one .safetensors file, its weights views of the mapped file where they can be."""
    path = Path(info.source)
    return load_mapped(cls, info.config, [path], dtype, str(path), convert=lambda state: to_diffusers(state, path))
