"""FLUX single-file checkpoints: the config from the tensor shapes (diffusers or Black Forest Labs names),
and loading with diffusers' own BFL converter. Read without building the model twice."""

from __future__ import annotations

from pathlib import Path

import torch

from svdexport.errors import SvdExportError
from svdexport.models import weights as wt
from svdexport.models.mapped import MappedWeights, SingleCatAsView, header_shapes, load_mapped
from svdexport.models.weights import WeightsInfo


def _transformer_class():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel


def is_bfl(names) -> bool:
    return any(k.startswith(("double_blocks.", "model.diffusion_model.")) for k in names)


def infer_config(shapes: dict[str, tuple]) -> dict:
    """A diffusers config from the tensor shapes of a FLUX checkpoint (diffusers or BFL names)."""

    def count(prefix: str) -> int:
        return len({k[len(prefix) + 1:].split(".")[0] for k in shapes if k.startswith(prefix + ".")})

    pre = "model.diffusion_model." if any(k.startswith("model.diffusion_model.") for k in shapes) else ""
    n = ({"x": "img_in.weight", "head": "double_blocks.0.img_attn.norm.query_norm.scale", "txt": "txt_in.weight",
          "pooled": "vector_in.in_layer.weight", "double": "double_blocks", "single": "single_blocks",
          "guidance": "guidance_in."} if is_bfl(shapes) else
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


def inspect_file(path: Path) -> WeightsInfo:
    """A .safetensors transformer: its config from config.json beside it, else from its tensor shapes."""
    return wt.inspect_file(path, _transformer_class(), lambda: infer_config(header_shapes(path)))


def to_diffusers(state: dict, path: Path) -> dict:
    """Black Forest Labs' layout converted by diffusers' own converter (diffusers' names pass as they are)."""
    if not is_bfl(state):
        return state
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    try:
        with SingleCatAsView():
            return convert_flux_transformer_checkpoint_to_diffusers(dict(state))
    except (KeyError, IndexError) as e:
        raise SvdExportError(f"{path} is not a FLUX transformer checkpoint ({e})") from None


def load_file(info: WeightsInfo, dtype: torch.dtype) -> MappedWeights:
    """The transformer from one .safetensors file, its weights views of the mapped file where they can be."""
    path = Path(info.source)
    return load_mapped(_transformer_class(), info.config, [path], dtype, str(path),
                       convert=lambda state: to_diffusers(state, path))
