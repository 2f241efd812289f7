"""`--attention sparse` on a diffusers FLUX or HunyuanVideo transformer: its block attentions run through diffusers'
own FlexAttention backend ("flex" of diffusers.models.attention_dispatch) with the tile-window BlockMask of
models/sparse_attention.py.

Why a processor wrapper at all (diffusers' `set_attention_backend("flex")` alone is not enough): the block mask must
reach the attention call, and the image tokens must be in tile order there. FLUX passes no mask to its blocks unless
the forward gets joint_attention_kwargs; HunyuanVideo builds its own padding mask inside its forward and passes that
(a bool tensor, which diffusers' flex backend would turn into a dense per-element mask). So `TiledAttention` wraps the
family's own processor (FluxAttnProcessor, HunyuanVideoAttnProcessor2_0: projections, norms, rotary, attention,
output all theirs, unchanged) and only (1) reorders the image tokens of its inputs and rotary table into tile order,
(2) hands it the BlockMask (for HunyuanVideo with the padding mask as the keys' run-time validity), and (3) restores
raster order on its output. Every projection is per token, so (1) and (3) change nothing but the order in which the
attention sees the tokens: with a window that keeps everything the result is the dense model's. Only the blocks'
attentions are wrapped; HunyuanVideo's token refiner keeps its own processor and the global backend is untouched.
Run eagerly (the eager backend, calibration), the same mask goes dense through SDPA; traced (torch.export, torch.compile)
it is FlexAttention's block-sparse kernel. The tests hold both to SDPA under the same mask.
"""

from __future__ import annotations

from torch import nn

import torch

from svdexport.errors import SvdExportError
from svdexport.models.sparse_attention import SparseLayout, SparseSpec, check_sparse, make_layout, parse_attention

# Why a backend cannot build a sparse-attention engine (None: it can).
REFUSALS = {
    "onnx": "ONNX has no FlexAttention operator (torch.onnx cannot export it): use aoti or inductor",
    "tensorrt": "torch-tensorrt has no FlexAttention converter (it is a higher-order op with a mask subgraph): "
                "use aoti or inductor",
}


# The image tokens' grid axes of the families that take `--attention sparse` (FLUX: rows x columns; HunyuanVideo:
# frames x rows x columns).
AXES = {"flux": 2, "hunyuanvideo": 3}


def refusal(backend: str, ranged: bool = False) -> str | None:
    """One line why `build --attention sparse` cannot use this backend or a ranged engine; None when it can."""
    if backend in REFUSALS:
        return f"--attention sparse cannot be built with --backend {backend}: {REFUSALS[backend]}"
    if ranged:
        return "--attention sparse needs a static engine (its block mask is made for one token grid): drop --min-*/--max-*"
    return None


def token_grid(family: str, shapes) -> tuple[int, ...]:
    """The image tokens' grid of a build shape: FLUX rows x columns, HunyuanVideo frames x rows x columns."""
    if family == "flux":
        return shapes.height // shapes.pixels_per_token, shapes.width // shapes.pixels_per_token
    if family == "hunyuanvideo":
        f, h, w = shapes.latent
        return f, h // 2, w // 2
    raise SvdExportError(f"--attention sparse is not available for {family} models")


def layout_for(family: str, shapes, spec: SparseSpec) -> SparseLayout:
    """The layout of a family at a build shape: FLUX's joint sequence is (text, image) with no text padding;
    HunyuanVideo's is (image, text) with the prompt's padding masked at run time."""
    video = family == "hunyuanvideo"
    return check_sparse(make_layout(spec, token_grid(family, shapes), shapes.text_len, text_first=not video,
                                    padded_text=video))


def install_recorded(transformer: nn.Module, family: str, shapes, option: str | None) -> None:
    """Installs the layout an engine's manifest records (its --attention option, at its build shapes) on a
    transformer rebuilt from the weights (the eager graphs of a load); None or "dense": nothing."""
    if option in (None, "dense"):
        return
    if family not in AXES:
        raise SvdExportError(f"--attention sparse is not available for {family} models (flux and hunyuanvideo)")
    install(transformer, layout_for(family, shapes, parse_attention(option, AXES[family])))


def _reordered(x: torch.Tensor, index: torch.Tensor, start: int, dim: int) -> torch.Tensor:
    """`x` with its `index.numel()` entries from `start` along `dim` taken in `index` order."""
    n = index.numel()
    parts = [x.narrow(dim, 0, start), x.narrow(dim, start, n).index_select(dim, index),
             x.narrow(dim, start + n, x.shape[dim] - start - n)]
    return torch.cat([p for p in parts if p.shape[dim]], dim)


class TiledAttention:
    """A diffusers attention processor run on tile-ordered image tokens with the layout's BlockMask (FlexAttention).

    In every block of both families the image tokens are the last `img_tokens` tokens of `hidden_states` (FLUX's
    single blocks get the joined (text, image) sequence, the others the image tokens alone) and the last rows of the
    rotary table (FLUX's covers text then image, HunyuanVideo's the image only), and of the first output."""

    def __init__(self, inner, layout: SparseLayout):
        from diffusers.models.attention_dispatch import AttentionBackendName

        self.inner = inner
        # Set on this processor only, per call (compiled: FLEX, eager: NATIVE), never the global backend.
        self.backends = (AttentionBackendName.FLEX, AttentionBackendName.NATIVE)
        self.layout = layout

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):
        lay, n = self.layout, self.layout.img_tokens
        hidden_states = _reordered(hidden_states, lay.order, hidden_states.shape[1] - n, 1)
        if image_rotary_emb is not None:
            image_rotary_emb = tuple(_reordered(t, lay.order, t.shape[0] - n, 0) for t in image_rotary_emb)
        key_valid = None
        if lay.padded_text:  # HunyuanVideo's [B, 1, 1, tokens] bool: the keys each sample attends to
            if attention_mask is None:
                raise SvdExportError("this sparse layout expects the transformer's text padding mask")
            key_valid = _reordered(attention_mask.reshape(attention_mask.shape[0], -1), lay.order,
                                   lay.text_len if lay.text_first else 0, 1)
        elif attention_mask is not None:
            raise SvdExportError("this sparse layout was made for a transformer that passes no attention mask")
        if torch.compiler.is_compiling():  # torch.export and torch.compile: the block-sparse FlexAttention kernel
            self.inner._attention_backend, mask = self.backends[0], lay.block_mask(key_valid)
        else:  # eager: the same mask, dense, through SDPA (eager FlexAttention is an unfused reference that calls
            # the mask function per element through vmap: tens of times slower than this at the digits models' sizes)
            self.inner._attention_backend, mask = self.backends[1], lay.dense(key_valid)[:, None]
        out = self.inner(attn, hidden_states, encoder_hidden_states, mask, image_rotary_emb, **kwargs)
        first = out[0] if isinstance(out, tuple) else out
        first = _reordered(first, lay.inverse, first.shape[1] - n, 1)
        return (first, *out[1:]) if isinstance(out, tuple) else first


def install(transformer: nn.Module, layout: SparseLayout) -> list:
    """Wraps the processors of every double- and single-stream block's attention and registers the layout once as
    `transformer.sparse_layout` (its tables are then buffers with one name each in an exported graph); returns the
    original processors (for `uninstall`). The transformer's weights and state dict are unchanged."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    blocks = (*transformer.transformer_blocks, *transformer.single_transformer_blocks)
    inners = [b.attn.processor.inner if isinstance(b.attn.processor, TiledAttention) else b.attn.processor
              for b in blocks]  # a new layout replaces an installed one
    other = next((p for p in inners if type(p) not in (FluxAttnProcessor, HunyuanVideoAttnProcessor2_0)), None)
    if other is not None:  # an IP-Adapter's or a user's processor: its weights and inputs are not ours to rebuild
        raise SvdExportError(f"--attention sparse needs the model's own attention processors, not {type(other).__name__}")
    # On the transformer's device (Module.to moves the buffers in place: the processors share this very layout).
    transformer.sparse_layout = layout.to(next(transformer.parameters()).device)
    originals = []
    for block, inner in zip(blocks, inners):
        originals.append(block.attn.processor)
        block.attn.set_processor(TiledAttention(type(inner)(), layout))
    return originals


def uninstall(transformer: nn.Module, originals: list) -> None:
    """Puts back the processors `install` returned."""
    for block, processor in zip((*transformer.transformer_blocks, *transformer.single_transformer_blocks), originals):
        block.attn.set_processor(processor)
    del transformer.sparse_layout
