"""Low-rank bases: Gram accumulation, the energy rule, and the principal/residual split.

A site's features F (tokens x D) over all calibration inputs and timesteps are summarised by the
Gram matrix G = sum F^T F (D x D, float64), so memory does not grow with the number of samples.
G = V diag(sigma^2) V^T gives the right singular vectors V and the squared singular values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from svdexport.errors import SvdExportError
from svdexport.files import save_tensors


def rank_for_energy(sigma2: torch.Tensor, tau: float) -> int:
    """Smallest k with sum(sigma2[:k]) / sum(sigma2) >= tau (sigma2 sorted descending)."""
    total = float(sigma2.sum())
    if total <= 0.0:
        return 0
    cumulative = torch.cumsum(sigma2.double(), 0) / total
    # A tiny tolerance so that tau = 1.0 is reached despite rounding in the cumulative sum.
    return int(torch.searchsorted(cumulative, torch.tensor([tau - 1e-12], dtype=cumulative.dtype)).item()) + 1


class GramAccumulator:
    """Running float64 sums of F^T F per site; F arrives stacked as [sites, batch, tokens, D]."""

    def __init__(self, num_sites: int, dim: int):
        self.shape = (num_sites, dim, dim)
        self.gram: torch.Tensor | None = None  # created on the features' device at the first add
        self.rows = 0  # feature rows (batch x tokens) seen per site
        self.timesteps = 0  # timesteps accumulated

    def add(self, features: torch.Tensor) -> None:
        f = features.detach().to(torch.float64).flatten(1, 2)  # [S, B*N, D]
        if self.gram is None:
            self.gram = torch.zeros(self.shape, dtype=torch.float64, device=f.device)
        self.gram += f.transpose(1, 2) @ f
        self.rows += f.shape[1]
        self.timesteps += 1

    def spectrum(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(V [S, D, D] with columns sorted by energy, sigma2 [S, D] descending)."""
        gram = self.gram.cpu() if self.gram is not None else torch.zeros(self.shape, dtype=torch.float64)
        eigvals, eigvecs = torch.linalg.eigh(gram)  # ascending
        sigma2 = eigvals.flip(-1).clamp_min(0.0)
        return eigvecs.flip(-1), sigma2


@dataclass
class Bases:
    """The stored low-rank bases of every cache site, zero-padded to k_max columns."""

    vectors: torch.Tensor  # [sites, D, k_max] float32; columns past a site's k are zero
    ranks: list[int]  # k chosen per site by the energy rule
    energy: list[float]  # fraction of the calibration energy the kept directions capture, per site
    sites: list[str]  # site names, in the graphs' order
    tau: float  # energy threshold used
    num_inputs: int  # calibration inputs (samples)
    num_timesteps: int  # calibration timesteps per input
    # What a `svdexport calibrate` file was calibrated for (family, weights digest, granularity): checked by
    # `build --bases`. Empty in an engine's own bases file.
    origin: dict = field(default_factory=dict)

    @property
    def k_max(self) -> int:
        return self.vectors.shape[-1]

    @classmethod
    def from_gram(cls, acc: GramAccumulator, sites: list[str], tau: float, k_max: int, num_inputs: int) -> "Bases":
        v, sigma2 = acc.spectrum()
        dim = v.shape[1]
        if not 0 <= k_max <= dim:
            raise SvdExportError(f"k_max={k_max} is outside [0, hidden size {dim}]")
        vectors = torch.zeros(len(sites), dim, k_max, dtype=torch.float64)
        ranks, energy = [], []
        for s in range(len(sites)):
            k = min(rank_for_energy(sigma2[s], tau), k_max)
            vectors[s, :, :k] = v[s, :, :k]
            total = float(sigma2[s].sum())
            ranks.append(k)
            energy.append(float(sigma2[s, :k].sum()) / total if total > 0 else 0.0)
        return cls(vectors.float(), ranks, energy, list(sites), tau, num_inputs, acc.timesteps // max(num_inputs, 1))

    def save(self, path: Path) -> None:
        meta = {
            "format": "svdexport.bases/1",
            "sites": json.dumps(self.sites),
            "ranks": json.dumps(self.ranks),
            "energy": json.dumps(self.energy),
            "tau": repr(self.tau),
            "k_max": str(self.k_max),
            "num_inputs": str(self.num_inputs),
            "num_timesteps": str(self.num_timesteps),
        }
        if self.origin:
            meta["origin"] = json.dumps(self.origin, sort_keys=True)
        save_tensors({"bases": self.vectors.contiguous()}, path, meta)

    @classmethod
    def load(cls, path: Path) -> "Bases":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                vectors = f.get_tensor("bases")
            if meta.get("format") != "svdexport.bases/1":
                raise ValueError("not an svdexport bases file")
            return cls(
                vectors=vectors,
                ranks=json.loads(meta["ranks"]),
                energy=json.loads(meta["energy"]),
                sites=json.loads(meta["sites"]),
                tau=float(meta["tau"]),
                num_inputs=int(meta["num_inputs"]),
                num_timesteps=int(meta["num_timesteps"]),
                origin=json.loads(meta.get("origin", "{}")),
            )
        except Exception as e:  # safetensors raises its own error type for damaged headers
            raise SvdExportError(f"cannot read bases file {path}: {e}") from None


def split(features: torch.Tensor, bases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal coefficients C = F V and residual R = F - C V^T, for stacked sites.

    features [S, B, N, D], bases [S, D, k] -> C [S, B, N, k], R [S, B, N, D].
    """
    v = bases.unsqueeze(1)  # [S, 1, D, k], broadcast over the batch
    coeffs = features @ v
    return coeffs, features - coeffs @ v.transpose(-1, -2)


def reconstruct(coeffs: torch.Tensor, residuals: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """F^ = P V^T + R, for stacked sites."""
    return coeffs @ bases.unsqueeze(1).transpose(-1, -2) + residuals
