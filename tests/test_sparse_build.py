"""`build --attention sparse` (issue 27 item 4) end to end on tiny models: aoti engines of FLUX and HunyuanVideo
against the same engine run eagerly (the sparse mask dense through SDPA), the compiled FlexAttention kernel against
dense attention when every block is kept, the manifest's record, `run` and reloads from the engine folder, and the
refusals of what cannot be built, each in one line before any work."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel, HunyuanVideoTransformer3DModel
from safetensors.torch import load_file

import svdexport
from svdexport.cli import main
from svdexport.models.sparse_attention import SparseSpec, make_layout
from helpers import assert_one_line_error, make_lora, quick_engine, run_cli

FLUX_TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6))
VIDEO_TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                  num_single_layers=1, num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8,
                  rope_axes_dim=(4, 6, 6), guidance_embeds=True)
QUICK = ["--calib-samples", "1", "--calib-steps", "3", "--plan", "uniform", "--k-max", "8", "--dtype", "fp32"]
# FLUX at 96x128 px: 6x8 tokens and 4 text tokens; 2x4-token tiles, +-1 tile row, the same tile column.
FLUX_ARGS = ["--height", "96", "--width", "128", "--text-len", "4", "--attention", "sparse:tile=2x4,window=1x0"]
# HunyuanVideo, 9 frames of 64x64 px: 3 x 4 x 4 tokens and 8 text tokens; 1x2x2 tiles within one latent frame.
VIDEO_ARGS = ["--model", "hunyuanvideo", "--frames", "9", "--height", "64", "--width", "64", "--text-len", "8",
              "--attention", "sparse:tile=1x2x2,window=0x1x1"]
# Relative to the output's largest value: compiled FlexAttention against SDPA under the same mask, fp32 (measured
# 3e-7 on FLUX, 1.4e-6 on HunyuanVideo with a padded prompt).
TOL = 1e-4


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return float((a - b).abs().max()) <= tol * float(b.abs().max())


def build_sparse(tmp_path_factory, name, model, args) -> Path:
    """An aoti sparse engine of `model` saved as a local diffusers folder (the engine references its weights)."""
    root = tmp_path_factory.mktemp(name)
    model.save_pretrained(root / "weights" / "transformer")
    out = root / "engine"
    assert main(["build", "--backend", "aoti", "--weights", str(root / "weights"), "--out", str(out),
                 "--graphs", str(root / "graphs"), *QUICK, *args]) == 0
    return out


@pytest.fixture(scope="module")
def flux_engine(tmp_path_factory):
    torch.manual_seed(0)
    out = build_sparse(tmp_path_factory, "flux-sparse", FluxTransformer2DModel(**FLUX_TINY).eval(), FLUX_ARGS)
    engine = svdexport.load(out)
    return out, engine, engine.eager_reference()


@pytest.fixture(scope="module")
def video_engine(tmp_path_factory):
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(**VIDEO_TINY).eval()
    out = build_sparse(tmp_path_factory, "video-sparse", model, VIDEO_ARGS)
    engine = svdexport.load(out)
    return out, engine, engine.eager_reference()


def full_state(engine, inputs, t):
    state = {**inputs, "bases": engine.sampler.bases, "timestep": torch.tensor([t])}
    return [state[n] for n in engine.full.input_names]


def dense_full_graph(engine):
    """The engine's full graph with dense attention: the same weights, eagerly."""
    fam = engine.family
    model = fam.load(fam.inspect(engine.manifest.model.weights.source), torch.float32)
    return fam.graphs(model, engine.cache.granularity)[0]


# ------------------------------------------------------------------------------------------------ FLUX


@pytest.mark.slow
def test_flux_sparse_engine_records_its_layout_and_matches_eager_sparse(flux_engine):
    out, engine, eager = flux_engine
    rec = engine.manifest.attention
    assert (rec.kind, rec.option, rec.tile, rec.window, rec.grid, rec.text_tokens) == \
        ("sparse", "sparse:tile=2x4,window=1x0", [2, 4], [1, 0], [6, 8], 4)
    assert 0 < rec.kept < 1 and 0 < rec.blocks_computed < 1
    # The full program is not in the graphs folder (torch 2.13 cannot save FlexAttention) and the folder says so;
    # the engine needs nothing from it: every file it loads is listed and hashed in its manifest.
    graphs = out.parent / "graphs"
    assert not (graphs / "full.pt2").exists() and (graphs / "cached.pt2").exists()
    assert "FlexAttention" in (graphs / "full.not-saved.txt").read_text()
    assert {"full.aoti.pt2", "cached.aoti.pt2", "constants.safetensors", "bindings.json"} <= set(engine.manifest.files)
    with torch.no_grad():
        state = full_state(engine, engine.example_inputs(3), 0.6)
        got, want, dense = engine.full(*state), eager.full(*state), dense_full_graph(engine)(*state)
    assert close(got[0], want[0]) and close(got[1], want[1])
    assert not close(want[0], dense[0], 1e-2)  # the mask is applied: sparse is not the dense model (2.7e-2 apart)
    a, b = engine.generate(seed=4, steps=6, interval=1), eager.generate(seed=4, steps=6, interval=1)
    assert close(a.latents, b.latents)
    a, b = engine.generate(seed=4, steps=6, interval=3), eager.generate(seed=4, steps=6, interval=3)
    assert a.cached_steps > 0 and close(a.latents, b.latents)


@pytest.mark.slow
def test_compiled_kernel_keeping_every_block_is_dense_attention(flux_engine):
    """The math identity behind the layout: the compiled full graph with its block tables rebound to a layout of the
    same tiles that keeps every block (tile order in, raster order out, FlexAttention over all blocks) is the dense
    model. (The build refuses such a layout: it would skip nothing.)"""
    _, engine, _ = flux_engine
    package = engine.full.fn
    every = make_layout(SparseSpec((2, 4), (3, 3)), (6, 8), 4, True, False)
    assert every.computed == 1.0
    values = dict(package.svdexport_constants)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        values[f"transformer.sparse_layout.{name}"] = getattr(every, name).contiguous()
    state = full_state(engine, engine.example_inputs(5), 0.3)
    with torch.no_grad():
        dense = dense_full_graph(engine)(*state)
    try:
        package.load_constants(values, check_full_update=True, user_managed=True)
        got = engine.full(*state)
    finally:
        package.load_constants(package.svdexport_constants, check_full_update=True, user_managed=True)
    assert close(got[0], dense[0]) and close(got[1], dense[1])


@pytest.mark.slow
def test_run_and_a_reload_from_the_engine_folder(flux_engine, tmp_path, capsys):
    out, engine, _ = flux_engine
    code, printed, err = run_cli(capsys, "run", out, "--steps", "5", "--seed", "7", "--out", tmp_path / "x.png")
    assert code == 0, err
    latents = next(iter(load_file(tmp_path / "x.safetensors").values()))
    again = svdexport.load(out)  # a second load: the packages and their bound tables from the folder alone
    assert close(latents, again.generate(seed=7, steps=5).latents, 1e-6)
    again.close()


@pytest.mark.slow
def test_a_lora_pushed_into_a_sparse_engine_matches_its_eager_twin(flux_engine, tmp_path):
    """A LoRA replaces weights only: the layout's tables stay bound, and the result is the eager sparse model's with
    the LoRA fused; unloading restores the base engine bit for bit."""
    out, engine, _ = flux_engine
    fam = engine.family
    lora = make_lora(tmp_path / "lora.safetensors", fam.load(fam.inspect(str(out.parent / "weights")), torch.float32))
    base = engine.generate(seed=2, steps=4, interval=1).latents
    try:
        engine.load_lora(lora, scale=0.8)
        got = engine.generate(seed=2, steps=4, interval=1).latents
        want = engine.eager_reference().generate(seed=2, steps=4, interval=1).latents
        assert close(got, want) and not close(got, base, 1e-2)
    finally:
        engine.unload_lora()
    assert torch.equal(engine.generate(seed=2, steps=4, interval=1).latents, base)


@pytest.mark.slow
@pytest.mark.extended
def test_inductor_compiles_the_sparse_full_graph_rebuilt_from_the_config(flux_engine, tmp_path):
    """inductor: the full program cannot be saved, so the engine rebuilds the graph from the model's config at load,
    binds the engine's constants (the weights and the layout's tables) to it and compiles it."""
    out, _, eager = flux_engine
    engine_dir = tmp_path / "inductor"
    assert main(["build", "--backend", "inductor", "--weights", str(out.parent / "weights"), "--out", str(engine_dir),
                 "--graphs", str(tmp_path / "graphs"), *QUICK, *FLUX_ARGS]) == 0
    engine = svdexport.load(engine_dir)
    options = engine.manifest.backend_options
    assert options["rebuilt"] == ["full"] and "full" not in options["programs"]
    a, b = engine.generate(seed=4, steps=6, interval=1), eager.generate(seed=4, steps=6, interval=1)
    assert close(a.latents, b.latents)
    engine.close()


# ------------------------------------------------------------------------------------------------ HunyuanVideo


@pytest.mark.slow
@pytest.mark.extended
def test_hunyuanvideo_sparse_engine_masks_the_prompt_padding_at_run_time(video_engine):
    _, engine, eager = video_engine
    rec = engine.manifest.attention
    assert (rec.tile, rec.window, rec.grid, rec.text_tokens) == ([1, 2, 2], [0, 1, 1], [3, 4, 4], 8)
    x = engine.example_inputs(2)
    short = {**x, "encoder_attention_mask": x["encoder_attention_mask"].clone()}
    short["encoder_attention_mask"][:, 3:] = 0  # a prompt of 3 tokens: the rest are padding keys
    with torch.no_grad():
        outs = {}
        for name, inputs in (("full", x), ("short", short)):
            state = full_state(engine, inputs, 700.0)
            outs[name] = engine.full(*state), eager.full(*state)
            assert close(outs[name][0][0], outs[name][1][0]) and close(outs[name][0][1], outs[name][1][1])
    assert not close(outs["short"][0][0], outs["full"][0][0], 1e-3)  # the padding is masked, not attended
    a, b = engine.generate(short, steps=5, interval=1), eager.generate(short, steps=5, interval=1)
    assert close(a.latents, b.latents)


def test_a_dense_engine_records_no_attention_and_loads_as_before(tmp_path_factory):
    """A dense build writes the manifest it wrote before the option (no `attention` field), which reads as dense."""
    out = quick_engine(tmp_path_factory, "dense")
    assert "attention" not in json.loads((out / "manifest.json").read_text())
    engine = svdexport.load(out)
    assert engine.manifest.attention is None
    engine.close()


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("argv, words", [
    (["--backend", "onnx", "--attention", "sparse"], ["--backend onnx", "FlexAttention"]),
    (["--attention", "sparse:tile=0x4"], ["tile=0x4", ">= 1"]),
    (["--attention", "flex"], ["dense or sparse"]),
    (["--attention", "sparse:tile=16x16"], ["tile 16x16 is larger than the 8x8 token grid"]),
    (["--attention", "sparse:tile=2x2,window=4"], ["keeps every block", "nothing is skipped"]),
    (["--attention", "sparse:tile=2x2", "--max-height", "256"], ["static engine", "--max-"]),
    (["--model", "sd3", "--attention", "sparse"], ["not available for sd3"]),
])
def test_what_cannot_be_built_is_refused_in_one_line_before_the_work(argv, words, tmp_path, capsys):
    out = tmp_path / "engine"
    code, _, err = run_cli(capsys, "build", "--out", out, "--graphs", tmp_path / "g", "--backend", "aoti",
                           "--height", "128", "--width", "128", "--text-len", "8", *argv)
    assert_one_line_error(code, err, *words)
    assert not out.exists() and not (tmp_path / "g").exists()
