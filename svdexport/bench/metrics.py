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
