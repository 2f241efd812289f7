"""Block-sparse attention masks (issue 27 item 4): tiles of image tokens attending to the tiles near them, and all
text tokens kept, for FlexAttention.

The image tokens form a grid (FLUX: rows x columns of latent tokens; HunyuanVideo: frames x rows x columns). The grid
is cut into tiles of `tile` tokens per axis and the image tokens are reordered tile by tile (sliding-tile style), so
that one FlexAttention block is one tile: a query tile attends to the key tiles within `window` tiles of it on every
axis. Every block the mask keeps is then a full block (no per-element mask work), which is what makes CPU FlexAttention
pay (docs/sparse.md: a block that needs its mask evaluated costs more than a dense one). Text tokens attend to every
token and every token attends to all text; HunyuanVideo's padded prompt tokens are masked as keys at run time (the
blocks that hold text keys are "partial" there, their mask evaluated per element from the runtime text mask).

Everything here depends on the shapes only: `SparseLayout` is made once per engine shape, outside the hot path.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from svdexport.errors import SvdExportError, clip

# The family's default when the user writes `--attention sparse`: 128-token tiles (one FlexAttention block each; on
# CPU a 64-token block costs about 2.1x its share of dense SDPA, a 128-token one about 1.6x: docs/sparse.md) and
# +-1 tile on every axis (sliding-tile attention's 3x3(x3) tile window). FLUX: 8 rows x 16 columns of latent tokens,
# a 24x48-token neighbourhood; at 1024x1024 (64x64 tokens, 512 text) the mask keeps 38% of the pairs. HunyuanVideo:
# 2 latent frames x 8x8 tokens; at 8 latent frames of 32x32 tokens (256 text) it keeps 29%.
DEFAULTS = {2: ((8, 16), (1, 1)), 3: ((2, 8, 8), (1, 1, 1))}
AXES = {2: "rows x columns", 3: "frames x rows x columns"}


@dataclass(frozen=True)
class SparseSpec:
    """`--attention sparse:tile=AxB[xC],window=N|AxB[xC]`: tile size in tokens and window in tiles, per grid axis."""

    tile: tuple[int, ...]
    window: tuple[int, ...]

    def text(self) -> str:
        """The option as the manifest records it (parse_attention(spec.text(), axes) == spec)."""
        return f"sparse:tile={'x'.join(map(str, self.tile))},window={'x'.join(map(str, self.window))}"

    def to_dict(self) -> dict:
        return {"kind": "sparse", "tile": list(self.tile), "window": list(self.window)}


@dataclass
class AttentionRecord:
    """A sparse-attention engine's layout as its manifest records it (a dense engine records none)."""

    kind: str  # "sparse"
    option: str  # the --attention option in full (the family's defaults filled in): what a load rebuilds
    tile: list[int]  # tokens per tile, per grid axis
    window: list[int]  # tiles attended on either side, per grid axis
    grid: list[int]  # the image tokens' grid at the build shapes
    text_tokens: int
    kept: float  # fraction of (query, key) pairs the mask keeps, every text token valid
    blocks_computed: float  # fraction of FlexAttention's (query, key) blocks computed: what the kernel pays for

    @classmethod
    def of(cls, layout: "SparseLayout") -> "AttentionRecord":
        return cls("sparse", layout.spec.text(), list(layout.spec.tile), list(layout.spec.window), list(layout.grid),
                   layout.text_len, round(layout.kept, 6), round(layout.computed, 6))


def parse_attention(text: str | None, axes: int) -> SparseSpec | None:
    """`--attention` of a family whose image tokens form an `axes`-dimensional grid: None for "dense" (or not given),
    else the sparse spec, with the family's defaults for what the option leaves out. Refuses bad text in one line."""
    if text is None or text == "dense":
        return None
    kind, _, rest = text.partition(":")
    if kind != "sparse":
        raise SvdExportError(f"--attention must be dense or sparse[:tile=...,window=...], got {clip(text)!r}")
    tile, window = DEFAULTS[axes]
    for item in filter(None, rest.split(",")) if rest else []:
        key, eq, value = item.partition("=")
        if key not in ("tile", "window") or not eq:
            raise SvdExportError(f"--attention sparse takes tile=... and window=... (e.g. {SparseSpec(*DEFAULTS[axes]).text()}), "
                                 f"got {clip(item)!r}")
        sizes = _sizes(value, axes, key, minimum=1 if key == "tile" else 0)
        tile, window = (sizes, window) if key == "tile" else (tile, sizes)
    return SparseSpec(tuple(tile), tuple(window))


def _sizes(value: str, axes: int, key: str, minimum: int) -> tuple[int, ...]:
    """'2' (every axis) or 'AxB[xC]' (one per axis, in AXES order) as integers >= minimum."""
    if not re.fullmatch(r"\d+(x\d+)*", value):
        raise SvdExportError(f"--attention sparse: {key}={clip(value)!r} is not N or {'x'.join('N' * axes)}")
    parts = tuple(int(v) for v in value.split("x"))
    if len(parts) == 1 and key == "window":
        parts = parts * axes
    if len(parts) != axes or min(parts) < minimum:
        raise SvdExportError(f"--attention sparse: {key}={value} must be {axes} integers >= {minimum} "
                             f"({AXES[axes]}) for this model")
    return parts


class SparseLayout(nn.Module):
    """One engine shape's sparse attention: the tile order of the image tokens and the block-sparse mask over the
    joint sequence as the attention processors concatenate it (FLUX: text then image; HunyuanVideo: image then text).

    A module whose tables are non-persistent buffers: installed once on the transformer (`sparse_layout`), they get
    stable names in an exported program and an AOTInductor package (a tensor a processor merely closed over would be
    lifted once per block, and AOTInductor renames such constants `_tensor_constantN`, which no binding can name), and
    they stay out of the transformer's state dict. Buffers: `order` [image tokens], the image token (in the
    transformer's own raster order) at each tile-ordered position, and `inverse`; `coord_f/_h/_w` [tokens] int32, per
    joint position its tile coordinate per axis (text: 0); `is_text` [tokens]; and FlexAttention's BlockMask tensors.
    `kept`: the fraction of (query, key) pairs the mask keeps (all text valid); `computed`: of blocks computed."""

    def __init__(self, spec: SparseSpec, grid: tuple[int, ...], text_len: int, text_first: bool, padded_text: bool,
                 tables: dict[str, torch.Tensor]):
        super().__init__()
        self.spec, self.grid, self.text_len = spec, tuple(grid), text_len
        self.text_first = text_first
        self.padded_text = padded_text  # text keys masked at run time (HunyuanVideo's padding): their blocks partial
        self.block = math.prod(spec.tile)
        for name, t in tables.items():
            self.register_buffer(name, t, persistent=False)
        self.kept = self.computed = 0.0

    @property
    def img_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def tokens(self) -> int:
        return self.img_tokens + self.text_len

    def structural(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """The mask between joint positions (tile-ordered), all text valid: FlexAttention mask_mod arithmetic (works
        on index tensors of any shape, inside and outside a traced graph)."""
        # One 1-D table per axis, indexed directly: torch 2.13's CPU FlexAttention kernel computes a row gather
        # followed by a column select (coords[q][..., a]) wrongly inside a partial block (docs/sparse.md).
        w = (0,) * (3 - len(self.spec.window)) + tuple(self.spec.window)
        near = [(c[q] - c[kv]).abs() <= wa for c, wa in zip((self.coord_f, self.coord_h, self.coord_w), w)]
        return self.is_text[q] | self.is_text[kv] | (near[0] & near[1] & near[2])

    def mask_mod(self, key_valid: torch.Tensor | None = None):
        """FlexAttention's mask_mod: the structural mask, and keys valid in `key_valid` [batch, tokens] (tile order)."""
        if key_valid is None:
            return lambda b, h, q, kv: self.structural(q, kv)
        return lambda b, h, q, kv: self.structural(q, kv) & key_valid[b, kv]

    def block_mask(self, key_valid: torch.Tensor | None = None):
        """The BlockMask of this shape (the precomputed block tensors; no work per call but the mask_mod closure)."""
        from torch.nn.attention.flex_attention import BlockMask

        if self.padded_text != (key_valid is not None):
            raise SvdExportError("a text key mask is given exactly when the layout was made for padded text")
        return BlockMask.from_kv_blocks(self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks,
                                        self.full_kv_indices, BLOCK_SIZE=self.block, mask_mod=self.mask_mod(key_valid),
                                        seq_lengths=(self.tokens, self.tokens), compute_q_blocks=False)

    def dense(self, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """The mask as a dense bool [batch or 1, tokens, tokens] in tile order (eager runs, references, tests);
        the structural part made once (a plain attribute: never part of an exported graph)."""
        if getattr(self, "_dense", None) is None or self._dense.device != self.order.device:
            idx = torch.arange(self.tokens, device=self.order.device)
            self._dense = self.structural(idx[:, None], idx[None, :])[None]
        return self._dense if key_valid is None else self._dense & key_valid[:, None, :]


def make_layout(spec: SparseSpec, grid: tuple[int, ...], text_len: int, text_first: bool,
                padded_text: bool) -> SparseLayout:
    """The layout of one shape; refuses, in one line, a tile that does not fit the grid."""
    if len(spec.tile) != len(grid):
        raise SvdExportError(f"--attention sparse: the tile has {len(spec.tile)} axes, the token grid {len(grid)}")
    if any(t > g for t, g in zip(spec.tile, grid)):
        raise SvdExportError(f"--attention sparse: tile {'x'.join(map(str, spec.tile))} is larger than the "
                             f"{'x'.join(map(str, grid))} token grid of these shapes")
    grid3 = (1,) * (3 - len(grid)) + tuple(grid)
    tile3 = (1,) * (3 - len(grid)) + tuple(spec.tile)
    pos = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid3), indexing="ij"), -1).reshape(-1, 3)
    tiles, within = pos // torch.tensor(tile3), pos % torch.tensor(tile3)
    ntiles = [-(-g // t) for g, t in zip(grid3, tile3)]
    # Tile-major order: by tile (frames, rows, columns), then raster order inside the tile.
    key = ((tiles[:, 0] * ntiles[1] + tiles[:, 1]) * ntiles[2] + tiles[:, 2]) * math.prod(tile3) \
        + (within[:, 0] * tile3[1] + within[:, 1]) * tile3[2] + within[:, 2]
    order = torch.argsort(key)
    img_coords = tiles[order].to(torch.int32)
    txt_coords = torch.zeros(text_len, 3, dtype=torch.int32)
    joint = torch.cat([txt_coords, img_coords] if text_first else [img_coords, txt_coords])
    is_text = torch.zeros(order.numel() + text_len, dtype=torch.bool)
    if text_first:
        is_text[:text_len] = True
    else:
        is_text[order.numel():] = True
    tables = {"order": order, "inverse": torch.argsort(order), "is_text": is_text,
              **{f"coord_{a}": joint[:, i].contiguous() for i, a in enumerate("fhw")}}
    layout = SparseLayout(spec, grid, text_len, text_first, padded_text, tables)
    _fill_blocks(layout)
    return layout


def check_sparse(layout: SparseLayout) -> SparseLayout:
    """Refuses, in one line, a layout whose mask keeps every block (a sparse engine that skips nothing)."""
    if layout.computed >= 1.0:
        raise SvdExportError(f"--attention {layout.spec.text()} keeps every block of the "
                             f"{'x'.join(map(str, layout.grid))} token grid (nothing is skipped): use a smaller tile "
                             "or window, or --attention dense")
    return layout


def _fill_blocks(layout: SparseLayout) -> None:
    """The BlockMask tensors: per query block the key blocks it needs, split into full ones (every pair kept, for any
    text mask) and partial ones (the mask evaluated per element). Computed one query block at a time (memory
    block x tokens), once per shape."""
    n, bs = layout.tokens, layout.block
    nb = -(-n // bs)
    keys = torch.arange(n)
    text_key = layout.is_text[keys]
    partial_rows, full_rows, kept = [], [], 0
    for i in range(nb):
        q = torch.arange(i * bs, min(n, (i + 1) * bs))
        upper = layout.structural(q[:, None], keys[None, :])  # every text key valid
        kept += int(upper.sum())
        lower = upper & ~text_key[None, :] if layout.padded_text else upper  # every text key padded
        pad = nb * bs - n  # the last key block's missing tail: empty for "any", kept for "all"
        any_ = torch.nn.functional.pad(upper, (0, pad), value=False).view(len(q), nb, bs).any(2).any(0)
        all_ = torch.nn.functional.pad(lower, (0, pad), value=True).view(len(q), nb, bs).all(2).all(0)
        full_rows.append(all_)
        partial_rows.append(any_ & ~all_)
    full, partial = torch.stack(full_rows), torch.stack(partial_rows)
    for name, t in zip(("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"),
                       (*_indices(partial), *_indices(full))):
        layout.register_buffer(name, t, persistent=False)
    layout.kept = kept / (n * n)
    layout.computed = float((full | partial).float().mean())


def _indices(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockMask's (num_blocks [1, 1, rows], indices [1, 1, rows, cols]) of a bool block matrix, kept blocks first."""
    num = blocks.sum(1).to(torch.int32)
    idx = torch.argsort((~blocks).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return num[None, None].contiguous(), idx[None, None].contiguous()
