"""Pictures of final latents, shared by the image and video families: a contrast-stretched view of the
first three latent channels (the pixels themselves for the bundled digits model)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def _stretch(x: torch.Tensor) -> np.ndarray:
    """[B, 3, ...] float -> uint8, contrast stretched per sample between its 1st and 99th percentile."""
    flat = x.flatten(1)
    shape = (-1,) + (1,) * (x.dim() - 1)
    lo, hi = flat.quantile(0.01, dim=1).view(shape), flat.quantile(0.99, dim=1).view(shape)
    x = ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    return (x * 255).round().byte().numpy()


def _rgb(x: torch.Tensor) -> torch.Tensor:
    """The first three channels (axis 1), or the first repeated for one-channel latents."""
    return x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, *x.shape[2:])


def image_strip(images: torch.Tensor, target: int = 256) -> Image.Image:
    """Images [B, C, H, W] side by side, scaled up to about `target` pixels (nearest neighbour)."""
    tiles = _stretch(_rgb(images)).transpose(0, 2, 3, 1)  # [B, H, W, 3]
    scale = max(1, target // max(tiles.shape[1], tiles.shape[2]))
    img = Image.fromarray(np.concatenate(list(tiles), axis=1))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def video_frames(videos: torch.Tensor, target: int = 128) -> list[list[Image.Image]]:
    """Videos [B, C, F, H, W] as frames, contrast-stretched per video."""
    x = _stretch(_rgb(videos)).transpose(0, 2, 3, 4, 1)  # [B, F, H, W, 3]
    scale = max(1, target // max(x.shape[2], x.shape[3]))
    return [[Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in video]
            for video in x]


def frame_grid(videos: list[list[Image.Image]]) -> Image.Image:
    """One row per video, one column per frame."""
    w, h = videos[0][0].size
    grid = Image.new("RGB", (w * len(videos[0]), h * len(videos)))
    for r, video in enumerate(videos):
        for c, frame in enumerate(video):
            grid.paste(frame, (c * w, r * h))
    return grid
