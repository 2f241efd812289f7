"""Engines inside diffusers' FluxPipeline: svdexport.apply against the uncached pipeline."""

import dataclasses
import importlib.util
import warnings

import pytest
import torch

import svdexport
from svdexport.cache.plan import StepPlan
from svdexport.errors import SvdExportError
from svdexport.builder.build import BuildOptions, build
from helpers import Recording, make_lora
from tiny_pipeline import prompt_embeds, tiny_pipeline

pytestmark = pytest.mark.slow  # engines of every backend or whole pipelines: the full suite only

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
SHAPES = dict(height=128, width=128, text_len=8)
CALL = dict(height=128, width=128, guidance_scale=3.5, output_type="pt")


def pipe_call(pipe, steps=10, batch=1, seed=1, **kw):
    return pipe(generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                **{**prompt_embeds(batch), **CALL, **kw}).images


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A FLUX pipeline folder (transformer, VAE, scheduler; no text encoders) as save_pretrained writes it."""
    root = tmp_path_factory.mktemp("pipe")
    tiny_pipeline().save_pretrained(root)
    return root


def engine_of(folder, tmp_path_factory, backend, **shapes):
    out = tmp_path_factory.mktemp(backend) / "engine"
    opts = BuildOptions(weights=str(folder), backend=backend, shapes={**SHAPES, **shapes}, calib_samples=1,
                        calib_steps=4)
    build(opts, out, graphs_dir=out.parent / "graphs", progress=False)
    return svdexport.load(out)


BACKENDS = ["eager", pytest.param("onnx", marks=pytest.mark.skipif(not HAS_ONNX, reason="onnx extra not installed"))]


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request, folder, tmp_path_factory):
    return engine_of(folder, tmp_path_factory, request.param)


class Counting:
    """Counts the calls of a graph."""

    def __init__(self, graph):
        self.graph, self.input_names, self.calls = graph, graph.input_names, 0

    def __call__(self, *args):
        self.calls += 1
        return self.graph(*args)


def test_interval_1_matches_the_uncached_pipeline(engine):
    pipe = tiny_pipeline()
    reference = pipe_call(pipe)
    svdexport.apply(pipe, engine, interval=1)
    got = pipe_call(pipe)
    # Images in [0, 1] through the real VAE; only the backend and the rotary table's float32 cast differ.
    assert (got - reference).abs().max() <= 1e-4


def test_cached_pipeline_runs_the_engines_plan_and_equals_its_own_loop(engine):
    pipe = svdexport.apply(tiny_pipeline(), engine)
    inputs = engine.example_inputs(seed=3)
    embeds = prompt_embeds()
    inputs.update(encoder_hidden_states=embeds["prompt_embeds"], pooled_projections=embeds["pooled_prompt_embeds"])
    full, engine.full = engine.full, Counting(engine.full)
    try:
        latents = pipe_call(pipe, steps=20, latents=inputs["hidden_states"], output_type="latent")
        calls = engine.full.calls
    finally:
        engine.full = full
    assert calls == len(StepPlan.uniform(20, engine.cache.warmup, engine.cache.interval).full_steps) == 5
    own = engine.generate(inputs, steps=20)
    assert torch.allclose(latents, own.latents, atol=1e-5)


def test_a_call_of_an_unfitted_step_count_says_so(engine):
    """The pipeline prints no plan, so a call whose step count the forecast is not fitted for warns."""
    pipe = svdexport.apply(tiny_pipeline(), engine)
    with pytest.warns(UserWarning, match="fitted for 4 steps.*--plan-steps 7"):
        pipe_call(pipe, steps=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the calibrated count: nothing to say
        pipe_call(pipe, steps=4)


def test_each_call_starts_a_fresh_cache(engine):
    pipe = svdexport.apply(tiny_pipeline(), engine)
    pipe_call(pipe, steps=20, seed=5)
    again = pipe_call(pipe, steps=7, seed=2)
    fresh = pipe_call(svdexport.apply(tiny_pipeline(), engine), steps=7, seed=2)
    assert torch.equal(again, fresh)


def test_true_cfg_keeps_one_cache_per_context(folder, tmp_path_factory):
    engine = engine_of(folder, tmp_path_factory, "eager")
    negative = prompt_embeds(seed=9)
    cfg = dict(true_cfg_scale=2.0, negative_prompt_embeds=negative["prompt_embeds"],
               negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"])
    pipe = tiny_pipeline()
    reference = pipe_call(pipe, **cfg)
    assert (pipe_call(svdexport.apply(pipe, engine, interval=1), **cfg) - reference).abs().max() <= 1e-4
    # Cached: cond and uncond each forecast their own features; sharing one state would mix them.
    pipe = svdexport.apply(tiny_pipeline(), engine)
    pipe_call(pipe, **cfg)
    caches = pipe.transformer._caches
    assert set(caches) == {"cond", "uncond"} and caches["cond"] is not caches["uncond"]
    assert not torch.equal(caches["cond"].state["residuals"], caches["uncond"].state["residuals"])


def test_smaller_batch_is_padded_and_larger_refused(folder, tmp_path_factory):
    engine = engine_of(folder, tmp_path_factory, "eager", batch=2)
    pipe = tiny_pipeline()
    reference = pipe_call(pipe)
    svdexport.apply(pipe, engine, interval=1)
    assert (pipe_call(pipe) - reference).abs().max() <= 1e-4
    assert pipe_call(pipe, batch=2).shape[0] == 2
    with pytest.raises(SvdExportError, match="built for batch 2"):
        pipe_call(pipe, batch=3)


def test_ranged_engine_takes_each_calls_batch_and_resolution_unpadded(folder, tmp_path):
    out = tmp_path / "engine"
    build(BuildOptions(weights=str(folder), shapes=SHAPES, calib_samples=1, calib_steps=4,
                       min_shapes={"height": 96, "width": 96}, max_shapes={"height": 160, "width": 160, "batch": 2}),
          out, progress=False)
    engine = svdexport.load(out)
    engine.step_cache = Recording(engine)  # records each step's inputs: their batch is the call's own
    pipe = svdexport.apply(tiny_pipeline(), engine, interval=1)
    for batch, height, width in ((1, 128, 128), (2, 96, 160)):
        size = dict(height=height, width=width)
        got = pipe_call(pipe, batch=batch, **size)
        assert (got - pipe_call(tiny_pipeline(), batch=batch, **size)).abs().max() <= 1e-4
    shapes = [tuple(x["encoder_hidden_states"].shape[:1]) + tuple(x["hidden_states"].shape[:2])
              for _, x, _ in engine.step_cache.steps]
    assert shapes == [(1, 1, 64)] * 10 + [(2, 2, 60)] * 10  # not padded to batch 2
    with pytest.raises(SvdExportError, match=r"serves batch 1\.\.2 \(rebuild with --max-batch 3\)"):
        pipe_call(pipe, batch=3)


def test_mismatched_requests_are_refused(engine):
    pipe = svdexport.apply(tiny_pipeline(), engine)
    with pytest.raises(SvdExportError, match="built for"):
        pipe_call(pipe, height=256, width=256)
    with pytest.raises(SvdExportError, match="built for"):
        pipe(prompt_embeds=torch.randn(1, 9, 32), pooled_prompt_embeds=torch.randn(1, 16), num_inference_steps=2,
             **CALL)
    with pytest.raises(SvdExportError, match="differs from the pipeline's transformer"):
        svdexport.apply(tiny_pipeline(guidance=False), engine)
    with pytest.raises(SvdExportError, match="cannot override"):
        svdexport.apply(tiny_pipeline(), engine, tau=0.5)


def test_loras_loaded_after_apply_reach_the_engine(engine, tmp_path):
    """pipe.load_lora_weights / set_adapters / unload_lora_weights on a pipeline running the engine: diffusers'
    own loader fills the stand-in's hollow transformer, and the next call pushes what changed into the engine."""
    lora = make_lora(tmp_path / "style.safetensors", tiny_pipeline().transformer, scale=1.0)
    pipe = svdexport.apply(tiny_pipeline(), engine)
    base = pipe_call(pipe, steps=6)  # warmup 3: three full steps, three cached (the LoRA changes both graphs)
    pipe.load_lora_weights(str(lora), adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.7])
    pipe.to("cpu")  # moves nothing of the stand-in (its hollow model's placeholders stay one element each)
    got = pipe_call(pipe, steps=6)
    try:
        engine.load_lora(lora, scale=0.7)  # the same LoRA through the engine's own loader
        want = pipe_call(svdexport.apply(tiny_pipeline(), engine), steps=6)  # no adapters: leaves the engine's
    finally:
        engine.unload_lora()
    assert (got - base).abs().max() > 1e-2
    assert (got - want).abs().max() <= 1e-5
    assert torch.equal(pipe_call(pipe, steps=6), got)  # the engine's weights changed under it: pushed again
    pipe.set_adapters(["style"], adapter_weights=[0.0])  # the weight is honoured: 0 is the base engine
    assert torch.equal(pipe_call(pipe, steps=6), base)
    pipe.set_adapters(["style"], adapter_weights=[0.7])
    assert torch.equal(pipe_call(pipe, steps=6), got)
    pipe.unload_lora_weights()
    assert torch.equal(pipe_call(pipe, steps=6), base) and engine.lora_weights() == 0  # bit for bit


def test_pipeline_loras_an_engine_cannot_take_are_refused(folder, tmp_path_factory, tmp_path):
    engine = engine_of(folder, tmp_path_factory, "eager")
    lora = make_lora(tmp_path / "style.safetensors", tiny_pipeline().transformer)
    fused = tiny_pipeline()
    fused.load_lora_weights(str(lora), adapter_name="style")
    fused.fuse_lora()
    with pytest.raises(SvdExportError, match="has fused LoRAs") as refused:
        svdexport.apply(fused, engine)
    pipe = svdexport.apply(tiny_pipeline(), engine)
    pipe.load_lora_weights(str(lora), adapter_name="style")
    with pytest.raises(SvdExportError, match="drop fuse_lora") as fuse:
        pipe.fuse_lora()
    # The engine's LoRA state (runtime/loras.py) sees a tensorrt engine built with immutable weights.
    engine.lora.manifest = dataclasses.replace(engine.manifest, backend="tensorrt")
    with pytest.raises(SvdExportError, match="'tensorrt' cannot load a LoRA") as load:
        pipe.load_lora_weights(str(lora), adapter_name="other")
    with pytest.raises(SvdExportError, match="'tensorrt' cannot load a LoRA") as call:
        pipe_call(pipe, steps=2)  # the adapter loaded before: refused when the call would push it
    assert all("\n" not in str(e.value) for e in (refused, fuse, load, call))


def _image_to_image(kind: str):
    """FluxImg2ImgPipeline or FluxInpaintPipeline from the tiny pipeline's components, and its extra inputs."""
    from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline

    g = torch.Generator().manual_seed(4)
    image = torch.rand(1, 3, 128, 128, generator=g)
    if kind == "img2img":
        return FluxImg2ImgPipeline(**tiny_pipeline().components), {"image": image}
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., 32:96, 32:96] = 1.0  # repaint the centre
    return FluxInpaintPipeline(**tiny_pipeline().components), {"image": image, "mask_image": mask}


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_image_to_image_pipelines_plan_the_steps_they_run(folder, tmp_path_factory, kind):
    engine = engine_of(folder, tmp_path_factory, "eager")
    pipe, extra = _image_to_image(kind)
    reference = pipe_call(pipe, steps=20, strength=0.6, **extra)
    svdexport.apply(pipe, engine, interval=1)
    assert (pipe_call(pipe, steps=20, strength=0.6, **extra) - reference).abs().max() <= 1e-4

    # Cached, strength 0.6 of 20 steps runs 12: the plan covers the 12 steps that run (the engine's plan for
    # 12 steps, with as many full steps as warmup 3 and interval 7 give: 4), not steps 8-19 of a 20-step plan.
    pipe, extra = _image_to_image(kind)
    svdexport.apply(pipe, engine)
    recording = Recording(engine)
    engine.step_cache = recording
    try:
        pipe_call(pipe, steps=20, strength=0.6, **extra)
    finally:
        del engine.step_cache
    assert [i for i, _, _ in recording.steps] == list(range(12))
    assert pipe.transformer.plan_of_last_call() == engine.plan(12).mask and sum(engine.plan(12).mask) == 4
    # The engine's own step cache over the same per-step inputs gives the same outputs.
    own = engine.step_cache(12)
    for i, inputs, out in recording.steps:
        assert torch.equal(own(i, inputs), out)
