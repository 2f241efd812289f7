"""Shared test helpers (imported by test files; no test file imports another): tiny models, a plain
diffusers sampling loop, a CachedSampler over a tiny model, and the CLI runners."""

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from svdexport.cache.config import CacheConfig
from svdexport.cli import main
from svdexport.models.flux import FLUX, SAMPLER_CONFIG, FluxShapes
from svdexport.runtime.scheduler import CachedSampler

TINY = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
# 128x128 px -> 8x8 = 64 image tokens, 8 text tokens: small enough for many whole generations.
TINY_SHAPES = FluxShapes(batch=1, height=128, width=128, text_len=8)
# CLI options of a quick build of the bundled model.
FAST = ["--calib-samples", "1", "--calib-steps", "4", "--height", "128", "--width", "128", "--text-len", "8"]


def tiny_model(guidance: bool = False, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TINY, guidance_embeds=guidance).eval().requires_grad_(False)


def flux_mu(image_tokens: int) -> float:
    # FLUX.1's resolution-dependent shift, restated from FluxPipeline's defaults (independent of svdexport).
    m = (1.15 - 0.5) / (4096 - 256)
    return image_tokens * m + 0.5 - m * 256


@torch.no_grad()
def plain_diffusers_loop(model, inputs, steps, shapes):
    """The FluxPipeline denoising loop, with the unmodified transformer."""
    sampler = FlowMatchEulerDiscreteScheduler.from_config(SAMPLER_CONFIG)
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


def random_bases(model, granularity, k, seed=0, family=FLUX):
    config = dict(model.config)
    n, d = len(family.sites(config, granularity)), family.hidden_size(config)
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, d, d, generator=g))[0][..., :k].contiguous()


def cached_sampler(model, granularity, shapes, bases=None, **cache):
    full, cached = FLUX.graphs(model, granularity)
    bases = random_bases(model, granularity, 8) if bases is None else bases
    cfg = CacheConfig(granularity=granularity, **cache).validate()
    return CachedSampler(full, cached, bases, cfg, FLUX.sampling(SAMPLER_CONFIG), shapes)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *words):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("svdexport: error:"), err
    for w in words:
        assert w in lines[0], lines[0]


class Recording:
    """Wraps an engine's StepCache factory (set it as `engine.step_cache`): records each step's index,
    inputs and output, so a test can replay them through the engine's own step cache."""

    def __init__(self, engine):
        self.steps, self.step_cache = [], engine.step_cache

    def __call__(self, steps, cache=None):
        inner, record = self.step_cache(steps, cache), self.steps

        class Recorded:
            plan = inner.plan

            def __call__(self, i, inputs):
                out = inner(i, inputs)
                record.append((i, {k: v.clone() for k, v in inputs.items()}, out.clone()))
                return out

        return Recorded()


def quick_engine(tmp_path_factory, name: str):
    """An eager engine of the bundled model with one calibration step: for tests that need an engine
    folder, not good bases."""
    out = tmp_path_factory.mktemp(name) / "engine"
    assert main(["build", "--out", str(out), *FAST, "--calib-steps", "1"]) == 0
    return out
