"""Synthetic feature trajectories and their plan statistics, for the plan and fitted-forecast tests."""

import torch

from svdexport.cache.plan_stats import PlanAccumulator


def orthonormal(sites, dim, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(sites, dim, dim, generator=g, dtype=torch.float64))[0][:, :, :k].float()


def random_walk(steps, sites=2, batch=2, tokens=3, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.cumsum(torch.randn(steps, sites, batch, tokens, dim, generator=g, dtype=torch.float64), 0)
    return f + 3 * torch.randn(sites, batch, tokens, dim, generator=g, dtype=torch.float64)


def trajectory_stats(traj, bases, sketch=None):
    acc = PlanAccumulator(traj.shape[0], bases, sketch=sketch)
    for i, f in enumerate(traj):
        acc.add(i, f)
    return acc.stats()


def site_weights_direct(traj):
    return 1.0 / traj.pow(2).sum(dim=(2, 3, 4)).mean(0).numpy()
