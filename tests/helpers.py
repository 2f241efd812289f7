"""Shared test helpers: a plain diffusers sampling loop and a CachedSampler over a tiny model."""

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from svdexport.cache.config import CacheConfig
from svdexport.models import flux
from svdexport.runtime.scheduler import CachedSampler


def flux_mu(image_tokens: int) -> float:
    # FLUX.1's resolution-dependent shift, restated from FluxPipeline's defaults.
    m = (1.15 - 0.5) / (4096 - 256)
    return image_tokens * m + 0.5 - m * 256


@torch.no_grad()
def plain_diffusers_loop(model, inputs, steps, shapes):
    """The FluxPipeline denoising loop, with the unmodified transformer."""
    sampler = FlowMatchEulerDiscreteScheduler.from_config(flux.SAMPLER_CONFIG)
    sampler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=flux_mu(shapes.img_tokens))
    latents = inputs["hidden_states"]
    for t in sampler.timesteps:
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        noise = model(
            hidden_states=latents, timestep=timestep / 1000, guidance=inputs.get("guidance"),
            pooled_projections=inputs["pooled_projections"], encoder_hidden_states=inputs["encoder_hidden_states"],
            txt_ids=inputs["txt_ids"], img_ids=inputs["img_ids"], return_dict=False,
        )[0]
        latents = sampler.step(noise, t, latents, return_dict=False)[0]
    return latents


def random_bases(model, granularity, k, seed=0):
    n = len(flux.sites(dict(model.config), granularity))
    d = flux.hidden_size(dict(model.config))
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, d, d, generator=g))[0][..., :k].contiguous()


def cached_sampler(model, granularity, shapes, bases=None, **cache):
    full, cached = flux.graphs(model, granularity)
    bases = random_bases(model, granularity, 8) if bases is None else bases
    cfg = CacheConfig(granularity=granularity, **cache).validate()
    sampler = flux.make_sampler(flux.SAMPLER_CONFIG)
    return CachedSampler(full, cached, bases, cfg, sampler, lambda s, n: flux.set_timesteps(s, n, shapes))
