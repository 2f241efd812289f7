import pytest
import torch

from svdexport.cache.svd import Bases, GramAccumulator, rank_for_energy, reconstruct, split
from svdexport.errors import SvdExportError


def features(sites=3, batch=2, tokens=40, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Decaying column scales give a spectrum with a clear principal part.
    scale = torch.logspace(0, -2, dim)
    return torch.randn(sites, batch, tokens, dim, generator=g, dtype=torch.float64) * scale


def test_full_rank_bases_reconstruct_exactly():
    f = features()
    acc = GramAccumulator(3, 16)
    acc.add(f)
    bases = Bases.from_gram(acc, ["a", "b", "c"], tau=1.0, k_max=16, num_inputs=1)
    assert bases.ranks == [16, 16, 16]
    coeffs, residuals = split(f.float(), bases.vectors)
    assert torch.allclose(coeffs @ bases.vectors.unsqueeze(1).transpose(-1, -2), f.float(), atol=1e-5)
    assert residuals.abs().max() < 1e-5


def test_split_then_reconstruct_is_identity_for_any_rank():
    f = features().float()
    v = torch.linalg.qr(torch.randn(3, 16, 16))[0][..., :5]
    c, r = split(f, v)
    assert torch.allclose(reconstruct(c, r, v), f, atol=1e-6)
    # The residual is orthogonal to the principal subspace.
    assert (r @ v.unsqueeze(1)).abs().max() < 1e-5


@pytest.mark.parametrize("tau,k", [(0.5, 1), (0.6, 2), (0.8, 2), (0.81, 3), (0.9, 3), (0.95, 4), (1.0, 4)])
def test_energy_rule_picks_smallest_rank_reaching_tau(tau, k):
    sigma2 = torch.tensor([0.5, 0.3, 0.1, 0.1, 0.0])  # cumulative 0.5, 0.8, 0.9, 1.0, 1.0
    assert rank_for_energy(sigma2, tau) == k


def test_gram_eigenvectors_match_svd_of_stacked_features():
    f = features(sites=1)
    acc = GramAccumulator(1, 16)
    acc.add(f[:, :1])
    acc.add(f[:, 1:])  # accumulating in two parts equals one SVD of everything
    v, sigma2 = acc.spectrum()
    _, s, vh = torch.linalg.svd(f[0].reshape(-1, 16), full_matrices=False)
    assert torch.allclose(sigma2[0], s**2, rtol=1e-8)
    # Singular vectors agree up to sign.
    assert torch.allclose((v[0].T @ vh.T).abs().diagonal(), torch.ones(16, dtype=torch.float64), atol=1e-6)


def test_bases_are_padded_to_k_max_and_capped():
    f = features()
    acc = GramAccumulator(3, 16)
    acc.add(f)
    bases = Bases.from_gram(acc, ["a", "b", "c"], tau=0.999, k_max=6, num_inputs=1)
    assert bases.vectors.shape == (3, 16, 6)
    assert all(k <= 6 for k in bases.ranks)
    low = Bases.from_gram(acc, ["a", "b", "c"], tau=0.3, k_max=6, num_inputs=1)
    for s, k in enumerate(low.ranks):
        assert k < 6
        assert low.vectors[s, :, k:].abs().max() == 0  # zero padding
        assert torch.allclose(low.vectors[s, :, :k].T @ low.vectors[s, :, :k], torch.eye(k), atol=1e-5)
        assert low.energy[s] >= 0.3


def test_bases_file_roundtrip(tmp_path):
    acc = GramAccumulator(3, 16)
    acc.add(features())
    bases = Bases.from_gram(acc, ["a", "b", "c"], tau=0.85, k_max=8, num_inputs=2)
    bases.save(tmp_path / "b.safetensors")
    back = Bases.load(tmp_path / "b.safetensors")
    assert torch.equal(back.vectors, bases.vectors)
    assert (back.ranks, back.sites, back.tau, back.num_inputs) == (bases.ranks, bases.sites, 0.85, 2)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SvdExportError, match="cannot read bases"):
        Bases.load(tmp_path / "bad.safetensors")
