"""Shared test helpers (imported by test files; no test file imports another): tiny models, a plain
diffusers sampling loop, a CachedSampler over a tiny model, and the CLI runners."""

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig, get_peft_model_state_dict

from svdexport.cache.config import CacheConfig
from svdexport.cli import main
from svdexport.files import sha256_file
from svdexport.models.flux import FLUX, SAMPLER_CONFIG, FluxShapes
from svdexport.runtime import manifest as manifest_io
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
    cache.setdefault("predictor", "svd-taylor")  # random bases and no calibration: nothing to fit weights on
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


# ---------------------------------------------------------------------------------------------- LoRAs
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_out"]  # proj_out: in both graphs at final granularity


def make_lora(path, model, seed=0, rank=4, targets=LORA_TARGETS, scale=0.5):
    """A PEFT LoRA of `model` with random A and B (PEFT starts B at zero), saved as diffusers saves LoRAs."""
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=targets))
    state = {k: v * scale for k, v in get_peft_model_state_dict(model).items()}
    model.unload_lora()
    FluxPipeline.save_lora_weights(path.parent, transformer_lora_layers=state, weight_name=path.name)
    return path


def digits_model():
    return FLUX.load(FLUX.inspect("bundled:digits"), torch.float32)


def fused_graphs(lora_path, scale):
    """The reference: diffusers' own LoRA loading and fusing on the base transformer, then its eager graphs."""
    model = digits_model()
    model.load_lora_adapter(str(lora_path), prefix="transformer")
    model.fuse_lora(lora_scale=scale)
    return FLUX.graphs(model, "final")


def graph_inputs(engine, name, seed=0):
    g = torch.Generator().manual_seed(seed)
    spec = engine.manifest.graphs[name]
    return [torch.randn(s, generator=g).to(getattr(torch, d)) for s, d in zip(spec.input_shapes, spec.input_dtypes)]


def check_lora_engine(engine, lora, tol):
    """LoRA changes the output, equals the fused eager graphs within `tol` of the output scale, stacks, and
    unloading restores the base output bit for bit; the engine folder is not touched."""
    files = {f: sha256_file(engine.folder / f) for f in engine.manifest.files}
    base_gen = engine.generate(seed=0, steps=8).latents
    base_out = [engine.full(*graph_inputs(engine, "full"))[0], engine.cached(*graph_inputs(engine, "cached"))]
    engine.load_lora(lora, scale=0.8)
    ref_full, ref_cached = fused_graphs(lora, 0.8)
    with torch.no_grad():
        for graph, ref, name, base in ((engine.full, ref_full, "full", base_out[0]),
                                       (engine.cached, ref_cached, "cached", base_out[1])):
            inputs = graph_inputs(engine, name)
            got, want = graph(*inputs), ref(*inputs)
            got, want = (got[0], want[0]) if name == "full" else (got, want)
            assert (got - base).abs().max() > 100 * tol * want.abs().max(), name  # the LoRA changes it
            assert (got - want).abs().max() <= tol * want.abs().max(), name
    lora_gen = engine.generate(seed=0, steps=8).latents
    eager = engine.eager_reference().generate(seed=0, steps=8).latents
    assert (lora_gen - eager).abs().max() <= tol * eager.abs().max()
    assert (lora_gen - base_gen).abs().max() > 1e-2
    engine.load_lora(lora, scale=0.8)  # stacked: twice the delta, differs again
    assert len(engine.loras) == 2 and not torch.equal(engine.generate(seed=0, steps=8).latents, lora_gen)
    engine.unload_lora()
    assert torch.equal(engine.generate(seed=0, steps=8).latents, base_gen)
    assert torch.equal(engine.full(*graph_inputs(engine, "full"))[0], base_out[0])
    assert files == {f: sha256_file(engine.folder / f) for f in engine.manifest.files}
    manifest_io.read(engine.folder)  # still verifies
