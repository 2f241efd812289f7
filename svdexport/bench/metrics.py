"""Image/latent agreement metrics."""

from __future__ import annotations

import math

import torch


def psnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB, the peak being the reference's value range."""
    x, reference = x.detach().double().cpu(), reference.detach().double().cpu()
    mse = float((x - reference).pow(2).mean())
    peak = float(reference.max() - reference.min())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def rel_l2(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float((x - reference).double().norm() / reference.double().norm())


def ssim(x: torch.Tensor, reference: torch.Tensor, data_range: float | None = None, window: int = 7,
         sigma: float = 1.5) -> float:
    """Mean structural similarity over images [B, C, H, W] (Gaussian window; 7 px suits small images)."""
    import torch.nn.functional as F

    x, y = x.detach().double().cpu(), reference.detach().double().cpu()
    rng = float(y.max() - y.min()) if data_range is None else data_range
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum())[:, None] * (g / g.sum())[None, :]
    k = g.expand(x.shape[1], 1, window, window)

    def blur(t):
        return F.conv2d(t, k, groups=x.shape[1])

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())
