"""The HunyuanVideo family: both graphs against diffusers' transformer, the sampler, the backends, the CLI."""

import importlib.util

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel
from PIL import Image

import svdexport
from svdexport.bench.metrics import psnr
from svdexport.cache.config import CacheConfig
from svdexport.cache.plan import StepPlan
from svdexport.cli import main
from svdexport.models import hunyuanvideo as hv
from svdexport.models.hunyuanvideo import HUNYUANVIDEO as HV
from svdexport.runtime.scheduler import CachedSampler
from helpers import assert_one_line_error, run_cli

TINY = dict(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=1,
            num_single_layers=2, num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8,
            rope_axes_dim=(4, 6, 6), guidance_embeds=True)
SHAPES = hv.VideoShapes(batch=1, frames=9, height=64, width=64, text_len=8)  # 3 x 4 x 4 = 48 tokens
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
FAST = ["--model", "hunyuanvideo", "--calib-samples", "1", "--calib-steps", "4"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(**TINY).eval().requires_grad_(False)


def unmodified(model, x, t):
    return model(hidden_states=x["hidden_states"], timestep=t, encoder_hidden_states=x["encoder_hidden_states"],
                 encoder_attention_mask=x["encoder_attention_mask"], pooled_projections=x["pooled_projections"],
                 guidance=x["guidance"], return_dict=False)[0]


def bases(model, granularity, k=8):
    n, d = len(HV.sites(dict(model.config), granularity)), HV.hidden_size(dict(model.config))
    return torch.linalg.qr(torch.randn(n, d, d, generator=torch.Generator().manual_seed(1)))[0][..., :k]


@torch.no_grad()
@pytest.mark.parametrize("granularity", ["block", "final"])
def test_full_graph_is_the_transformer_and_cached_step_with_exact_features_equals_it(model, granularity):
    x = HV.example_inputs(dict(model.config), SHAPES, seed=2)
    t = torch.tensor([620.0])
    full, cached = HV.graphs(model, granularity)
    state = {**x, "timestep": t, "bases": bases(model, granularity)}
    out, coeffs, residuals = full(*[state[n] for n in full.input_names])
    assert torch.equal(out, unmodified(model, x, t))
    assert coeffs.shape == (len(HV.sites(dict(model.config), granularity)), 1, SHAPES.img_tokens, 8)
    # With this step's own C and R the cached step rebuilds the image stream exactly: same output.
    state.update(coeffs=coeffs, residuals=residuals)
    again = cached(*[state[n] for n in cached.input_names])
    assert again.shape == out.shape and (again - out).abs().max() <= 1e-5 * out.abs().max()


def test_padded_text_tokens_are_masked(model):
    """The attention mask reaches the transformer: changing masked-out text tokens changes nothing."""
    x = HV.example_inputs(dict(model.config), SHAPES, seed=3)
    y = {**x, "encoder_hidden_states": x["encoder_hidden_states"].clone()}
    y["encoder_hidden_states"][:, -1] += 5.0  # the last quarter of the tokens is masked
    with torch.no_grad():
        a, b = unmodified(model, x, torch.tensor([300.0])), unmodified(model, y, torch.tensor([300.0]))
    assert torch.allclose(a, b, atol=1e-5)


def test_paper_schedule_and_interval_1_equals_the_pipelines_loop(model):
    assert len(StepPlan.uniform(50, hv.DEFAULTS.warmup, hv.DEFAULTS.interval).full_steps) == 9  # the paper's 5.56x
    full, cached = HV.graphs(model, "final")
    loop = CachedSampler(full, cached, bases(model, "final"), CacheConfig(interval=1),
                         HV.sampling(hv.SAMPLER_CONFIG), SHAPES)
    x = HV.example_inputs(dict(model.config), SHAPES, seed=4)
    got = loop.generate(x, steps=8).latents
    # HunyuanVideoPipeline's loop, restated: sigmas linspace(1, 0, n + 1)[:-1], shift 7, raw timesteps.
    sampler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    sampler.set_timesteps(sigmas=np.linspace(1.0, 0.0, 9)[:-1])
    latents = x["hidden_states"]
    with torch.no_grad():
        for t in sampler.timesteps:
            noise = unmodified(model, {**x, "hidden_states": latents}, t.expand(1).to(latents.dtype))
            latents = sampler.step(noise, t, latents, return_dict=False)[0]
    assert (got - latents).abs().max() <= 1e-5


BACKENDS = ["aoti", pytest.param("onnx", marks=pytest.mark.skipif(not HAS_ONNX, reason="onnx extra not installed"))]


@pytest.fixture(scope="module", params=BACKENDS)
def built(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"hv-{request.param}") / "engine"
    assert main(["build", "--backend", request.param, "--out", str(out), "--graphs", str(out.parent / "g"),
                 *FAST]) == 0
    engine = svdexport.load(out)
    return out, engine, engine.eager_reference()


@pytest.mark.slow
def test_engine_matches_eager(built):
    _, engine, eager = built
    assert (engine.cache.warmup, engine.cache.interval, engine.steps) == (1, 6, 50)
    state = {**engine.example_inputs(5), "bases": engine.sampler.bases, "timestep": torch.tensor([410.0])}
    with torch.no_grad():
        want = eager.full(*[state[n] for n in eager.full.input_names])
    got = engine.full(*[state[n] for n in engine.full.input_names])
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    a, b = engine.generate(seed=6), eager.generate(seed=6)
    assert (a.full_steps, a.cached_steps) == (9, 41)
    assert psnr(a.latents, b.latents) >= 40


@pytest.mark.slow
def test_compiled_engine_takes_a_lora(built, tmp_path):
    """A HunyuanVideo LoRA (PEFT, saved by diffusers' HunyuanVideoPipeline) pushed into the aoti and onnx
    engines equals diffusers' transformer with it fused, and unloading gives the base output bit for bit."""
    from diffusers import HunyuanVideoPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    _, engine, _ = built
    model = HV.load(HV.inspect(engine.manifest.model.weights.source), engine.dtype)
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "proj_out"]))
    state = {k: v * 0.5 for k, v in get_peft_model_state_dict(model).items()}
    HunyuanVideoPipeline.save_lora_weights(tmp_path, transformer_lora_layers=state, weight_name="hv.safetensors")
    model.unload_lora()  # the reference is the file as diffusers loads it, fused
    model.load_lora_adapter(str(tmp_path / "hv.safetensors"), prefix="transformer")
    model.fuse_lora()
    fused_full, _ = HV.graphs(model, engine.cache.granularity)
    state = {**engine.example_inputs(5), "bases": engine.sampler.bases, "timestep": torch.tensor([410.0])}
    inputs = [state[n] for n in engine.full.input_names]
    base = engine.full(*inputs)[0]
    engine.load_lora(tmp_path / "hv.safetensors")
    try:
        with torch.no_grad():
            got, want = engine.full(*inputs)[0], fused_full(*inputs)[0]
        assert (got - base).abs().max() > 1e-2 * want.abs().max()  # the LoRA changes the output
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    finally:
        engine.unload_lora()
    assert torch.equal(engine.full(*inputs)[0], base)


@pytest.mark.slow
def test_run_writes_the_video_and_a_frame_grid(built, tmp_path, capsys):
    out, _, _ = built
    code, _, err = run_cli(capsys, "run", out, "--out", tmp_path / "v.png")
    assert_one_line_error(code, err, ".gif or .mp4", "video engine")  # a video is not a PNG
    code, stdout, err = run_cli(capsys, "run", out, "--steps", "10", "--out", tmp_path / "v.gif")
    assert code == 0, err
    gif = Image.open(tmp_path / "v.gif")
    assert gif.n_frames == 3  # 9 video frames -> 3 latent frames
    grid = Image.open(tmp_path / "v.png")
    assert grid.width == 3 * grid.height  # one row, three frames
    assert "10 steps: 2 full, 8 cached" in stdout  # steps 0 and 6


@pytest.mark.slow
@pytest.mark.extended
def test_compare_reports_temporal_consistency(tmp_path, capsys):
    out = tmp_path / "engine"
    assert main(["build", "--out", str(out), *FAST]) == 0
    code, stdout, err = run_cli(capsys, "compare", out, "--samples", "2", "--steps", "12", "--intervals", "3",
                                "--json", tmp_path / "c.json", "--temporal", tmp_path / "t.png")
    assert code == 0, err
    import json

    result = json.loads((tmp_path / "c.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["eager full compute"]["temporal_psnr_db"] == pytest.approx(np.mean(result["temporal"]["reference"]))
    assert all(r["temporal_psnr_db"] is not None for r in rows.values())
    assert set(result["config"]["peers"]) == set(HV.peer_libraries) - set(result["config"]["peers_unavailable"])
    assert {r["peer"] for r in rows.values() if r["peer"]} == set(result["config"]["peers"])  # a row each
    assert "temporal PSNR" in stdout
    width, height = Image.open(tmp_path / "t.png").size
    assert width > height > 100  # the 9 x 5 inch temporal plot


@pytest.mark.parametrize("argv,words", [
    (["--frames", "8"], ["frames=8", "4k + 1"]),
    (["--height", "72"], ["height=72"]),
    (["--weights", "model.safetensors"], ["not found"]),
    (["--label", "1"], []),
])
def test_bad_video_input(tmp_path, capsys, argv, words):
    if argv[0] == "--label":  # run option on a built engine
        out = tmp_path / "e"
        assert run_cli(capsys, "build", "--out", out, *FAST)[0] == 0
        code, _, err = run_cli(capsys, "run", out, "--label", "1", "--out", tmp_path / "x.gif")
        assert_one_line_error(code, err, "not class-conditioned")
        return
    code, _, err = run_cli(capsys, "build", "--out", tmp_path / "never", *FAST, *argv)
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_local_folder_weights(model, tmp_path, capsys):
    """--weights DIR: a diffusers folder with transformer/ (as the HunyuanVideo repository has) and its
    scheduler config, which replaces the default sampler settings."""
    model.save_pretrained(tmp_path / "hv" / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=5.0).save_pretrained(tmp_path / "hv" / "scheduler")
    out = tmp_path / "e"
    code, _, err = run_cli(capsys, "build", "--weights", tmp_path / "hv", "--out", out, "--frames", "5",
                           "--height", "64", "--width", "64", "--text-len", "8", *FAST)
    assert code == 0, err
    engine = svdexport.load(out)
    assert engine.manifest.sampler["shift"] == 5.0 and engine.config["num_single_layers"] == 2
    eager = HV.load(HV.inspect(str(tmp_path / "hv")), torch.float32)
    x = engine.example_inputs(1)
    state = {**x, "bases": engine.sampler.bases, "timestep": torch.tensor([500.0])}
    with torch.no_grad():
        assert torch.equal(engine.full(*[state[n] for n in engine.full.input_names])[0],
                           unmodified(eager, x, torch.tensor([500.0])))
