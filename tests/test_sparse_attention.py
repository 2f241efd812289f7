"""Sparse tile-window attention (issue 27 item 4): option parsing, mask properties against a brute-force definition,
and the sparse transformers against dense attention masked the same way (SDPA), in eager and compiled FlexAttention."""

import itertools

import pytest
import torch
from diffusers import FluxTransformer2DModel, HunyuanVideoTransformer3DModel
from torch.nn.attention.flex_attention import flex_attention

from svdexport.errors import SvdExportError
from svdexport.models import hunyuanvideo as hv
from svdexport.models.flux import FLUX, FluxShapes
from svdexport.models.flux import example_inputs as flux_inputs
from svdexport.models.hunyuanvideo import HUNYUANVIDEO as HV
from svdexport.models.sparse_attention import SparseSpec, check_sparse, make_layout, parse_attention
from svdexport.models.sparse_processor import install, layout_for, refusal, uninstall

FLUX_TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6))
VIDEO_TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                  num_single_layers=1, num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8,
                  rope_axes_dim=(4, 6, 6), guidance_embeds=True)


def brute_force(grid, tile, window, text_len, text_first):
    """The mask by its definition, in the transformer's own token order (raster image tokens): image tokens attend to
    image tokens whose tiles are within `window` tiles on every axis; text attends and is attended everywhere."""
    cells = list(itertools.product(*(range(g) for g in grid)))
    n = len(cells) + text_len
    mask = torch.ones(n, n, dtype=torch.bool)
    off = text_len if text_first else 0
    for i, a in enumerate(cells):
        for j, b in enumerate(cells):
            mask[off + i, off + j] = all(abs(x // t - y // t) <= w for x, y, t, w in zip(a, b, tile, window))
    return mask


def in_raster_order(layout, mask):
    """A tile-ordered [.., tokens, tokens] mask in the transformer's own token order."""
    n, t = layout.img_tokens, layout.text_len
    joint = torch.cat([torch.arange(t), t + layout.order]) if layout.text_first else torch.cat(
        [layout.order, n + torch.arange(t)])
    inv = torch.argsort(joint)
    return mask[..., inv, :][..., :, inv]


# ------------------------------------------------------------------------------------------------ options


def test_parse_attention_defaults_explicit_values_and_round_trip():
    assert parse_attention(None, 2) is None and parse_attention("dense", 3) is None
    assert parse_attention("sparse", 2) == SparseSpec((8, 16), (1, 1))
    assert parse_attention("sparse", 3) == SparseSpec((2, 8, 8), (1, 1, 1))
    assert parse_attention("sparse:window=2", 2) == SparseSpec((8, 16), (2, 2))
    assert parse_attention("sparse:tile=1x4x4,window=0x1x2", 3) == SparseSpec((1, 4, 4), (0, 1, 2))
    for spec in (SparseSpec((4, 8), (0, 3)), SparseSpec((1, 2, 2), (1, 0, 1))):
        assert parse_attention(spec.text(), len(spec.tile)) == spec


@pytest.mark.parametrize("text, axes, words", [
    ("sparse:tile=8x8", 3, ["tile=8x8", "3 integers"]),
    ("sparse:tile=0x8", 2, ["tile=0x8", ">= 1"]),
    ("sparse:window=1x2x3", 2, ["window=1x2x3"]),
    ("sparse:size=4", 2, ["size=4"]),
    ("sparse:tile=8xx8", 2, ["8xx8"]),
    ("sparse:window", 2, ["'window'"]),
    ("flex", 2, ["dense or sparse"]),
])
def test_parse_attention_refuses_bad_options_in_one_line(text, axes, words):
    with pytest.raises(SvdExportError) as e:
        parse_attention(text, axes)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_backends_and_ranged_engines_that_cannot_take_it_are_refused_in_one_line():
    assert refusal("aoti") is None and refusal("inductor") is None
    for backend in ("onnx", "tensorrt"):
        assert backend in refusal(backend) and "\n" not in refusal(backend)
    assert "static" in refusal("aoti", ranged=True)


# ------------------------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("grid, tile, window, text_len, text_first, padded", [
    ((6, 8), (2, 4), (1, 1), 8, True, False),  # FLUX-like, tiles divide the grid
    ((5, 7), (2, 3), (1, 0), 3, True, False),  # ragged last tiles, text not block-aligned
    ((3, 4, 6), (1, 2, 2), (1, 1, 1), 5, False, True),  # HunyuanVideo-like, padded text last
    ((3, 5, 5), (2, 2, 4), (0, 1, 1), 4, False, True),  # ragged in every axis
])
def test_layout_mask_is_the_definition_and_its_blocks_are_exact(grid, tile, window, text_len, text_first, padded):
    lay = make_layout(SparseSpec(tile, window), grid, text_len, text_first, padded)
    assert torch.equal(torch.sort(lay.order).values, torch.arange(lay.img_tokens))
    assert torch.equal(lay.order[lay.inverse], torch.arange(lay.img_tokens))
    dense = lay.dense()[0]
    assert torch.equal(in_raster_order(lay, dense), brute_force(grid, tile, window, text_len, text_first))
    assert lay.kept == pytest.approx(dense.float().mean().item())
    # Every block the mask marks full holds only kept pairs (for any text padding), every block it leaves out none,
    # and what is neither is listed as partial.
    valid = torch.ones(1, lay.tokens, dtype=torch.bool)
    valid[0, lay.is_text] = False  # the worst padding: every text key masked
    masked = lay.dense(valid)[0] if padded else dense
    n, bs = lay.tokens, lay.block
    nb = -(-n // bs)
    for i, j in itertools.product(range(nb), range(nb)):
        sub, sub_masked = dense[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs], masked[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs]
        full = j in lay.full_kv_indices[0, 0, i, :lay.full_kv_num_blocks[0, 0, i]].tolist()
        partial = j in lay.kv_indices[0, 0, i, :lay.kv_num_blocks[0, 0, i]].tolist()
        assert not (full and partial)
        assert full == bool(sub_masked.all()), (i, j)
        assert (full or partial) == bool(sub.any()), (i, j)


def test_aligned_tiles_make_every_kept_image_block_full():
    """The property that makes CPU FlexAttention pay: with block-aligned text and tiles that divide the grid, no block
    needs its mask evaluated (FLUX); with padded text only the text-key blocks do (HunyuanVideo)."""
    flux = make_layout(SparseSpec((2, 4), (1, 1)), (8, 8), 16, True, False)
    assert int(flux.kv_num_blocks.sum()) == 0 and 0 < flux.computed < 1
    video = make_layout(SparseSpec((1, 2, 4), (1, 1, 1)), (3, 4, 8), 16, False, True)
    partial = {j for i in range(video.kv_indices.shape[2]) for j in video.kv_indices[0, 0, i, :video.kv_num_blocks[0, 0, i]].tolist()}
    assert partial == {video.img_tokens // video.block, video.img_tokens // video.block + 1}  # the 2 text blocks


def test_a_window_that_skips_nothing_or_a_tile_larger_than_the_grid_is_refused():
    with pytest.raises(SvdExportError, match="keeps every block"):
        check_sparse(make_layout(SparseSpec((2, 2), (3, 3)), (4, 4), 4, True, False))
    with pytest.raises(SvdExportError, match="larger than the 4x4 token grid"):
        make_layout(SparseSpec((8, 2), (1, 1)), (4, 4), 4, True, False)


def test_compiled_flex_attention_keeps_the_masks_semantics_with_padded_text():
    """Inductor's CPU FlexAttention kernel against SDPA with the same dense mask: partial text-key blocks (the run-time
    padding), full and skipped image blocks, different prompt lengths per sample."""
    lay = make_layout(SparseSpec((1, 2, 4), (1, 1, 1)), (3, 4, 8), 16, False, True)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, lay.tokens, 16, generator=g) for _ in range(3))
    valid = torch.ones(2, lay.tokens, dtype=torch.bool)
    valid[0, lay.img_tokens + 11:] = False
    valid[1, lay.img_tokens + 3:] = False
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=lay.dense(valid)[:, None])
    torch._dynamo.reset()
    out = torch.compile(flex_attention)(q, k, v, block_mask=lay.block_mask(valid))
    assert (out - ref).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------------ transformers


class DenseMasked:
    """A test processor: the block's own processor with a dense bool mask (and the model's own padding mask), SDPA."""

    def __init__(self, inner, mask):
        self.inner, self.mask = inner, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        mask = self.mask[None, None] if attention_mask is None else self.mask[None, None] & attention_mask
        return self.inner(attn, hidden_states, encoder_hidden_states, mask, image_rotary_emb)


def masked_reference(model, mask, call):
    blocks = (*model.transformer_blocks, *model.single_transformer_blocks)
    own = [b.attn.processor for b in blocks]
    for b in blocks:
        b.attn.set_processor(DenseMasked(b.attn.processor, mask))
    try:
        return call()
    finally:
        for b, p in zip(blocks, own):
            b.attn.set_processor(p)


@pytest.fixture(params=["eager", "flex"])
def path(request, monkeypatch):
    """Which attention the sparse processors run: eager (the dense mask through SDPA) or, as they do when traced,
    FlexAttention with the BlockMask (here its eager reference implementation)."""
    if request.param == "flex":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    return request.param


@torch.no_grad()
def test_flux_sparse_attention_is_dense_attention_under_the_same_mask(path):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**FLUX_TINY).eval()
    shapes = FluxShapes(batch=1, height=96, width=128, text_len=4)  # 6x8 tokens
    kw = FLUX.forward_kwargs(flux_inputs(dict(model.config), shapes, 0), torch.tensor([0.4]))
    dense = model(**kw)[0]
    keys = set(model.state_dict())
    spec = SparseSpec((2, 4), (1, 0))
    ref = masked_reference(model, brute_force((6, 8), spec.tile, spec.window, 4, True), lambda: model(**kw)[0])
    originals = install(model, layout_for("flux", shapes, spec))
    assert set(model.state_dict()) == keys  # the layout's tables are not weights
    out = model(**kw)[0]
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max() and (out - dense).abs().max() > 1e-3
    install(model, make_layout(SparseSpec((2, 4), (3, 3)), (6, 8), 4, True, False))  # keeps everything
    assert (model(**kw)[0] - dense).abs().max() < 1e-5 * dense.abs().max()
    uninstall(model, originals)
    assert torch.equal(model(**kw)[0], dense) and not hasattr(model, "sparse_layout")


@torch.no_grad()
def test_hunyuanvideo_sparse_attention_is_dense_attention_under_the_same_mask_and_padding(path):
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(**VIDEO_TINY).eval()
    shapes = hv.VideoShapes(batch=2, frames=9, height=64, width=96, text_len=6)  # 3 x 4 x 6 tokens
    x = HV.example_inputs(dict(model.config), shapes, seed=2)
    x["encoder_attention_mask"][1, 2:] = 0  # the second prompt is shorter
    kw = HV.forward_kwargs(x, torch.tensor([600.0, 600.0]))
    spec = SparseSpec((1, 2, 3), (1, 1, 0))
    mask = brute_force((3, 4, 6), spec.tile, spec.window, 6, False)
    ref = masked_reference(model, mask, lambda: model(**kw)[0])
    install(model, layout_for("hunyuanvideo", shapes, spec))
    out = model(**kw)[0]
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max()


def test_other_attention_processors_are_refused_in_one_line():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**FLUX_TINY).eval()
    block = model.transformer_blocks[0].attn
    block.set_processor(DenseMasked(block.processor, torch.ones(1, 1, dtype=torch.bool)))
    shapes = FluxShapes(batch=1, height=96, width=128, text_len=4)
    with pytest.raises(SvdExportError, match="own attention processors, not DenseMasked"):
        install(model, layout_for("flux", shapes, SparseSpec((2, 4), (1, 0))))
    assert not hasattr(model, "sparse_layout")


@torch.no_grad()
def test_exported_full_graph_names_the_layout_tables_once():
    """torch.export sees the layout's tables as buffers of `transformer.sparse_layout` (named once, bound like any
    engine constant), not as tensors lifted per attention block (which AOTInductor renames beyond binding)."""
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**FLUX_TINY).eval()
    shapes = FluxShapes(batch=1, height=96, width=128, text_len=4)
    install(model, layout_for("flux", shapes, SparseSpec((2, 4), (1, 0))))
    full, _ = FLUX.graphs(model, "block")
    cfg = dict(model.config)
    sites = len(FLUX.sites(cfg, "block"))
    state = {**flux_inputs(cfg, shapes, 0), "timestep": torch.tensor([0.4]),
             "bases": torch.linalg.qr(torch.randn(sites, 32, 32))[0][..., :4].contiguous()}
    program = torch.export.export(full, tuple(state[n] for n in full.input_names), strict=False)
    assert all(k.startswith("transformer.sparse_layout.") for k in program.constants), list(program.constants)
    assert {k.rsplit(".", 1)[1] for k in program.constants} >= {"order", "inverse", "kv_indices", "full_kv_indices"}
