"""SD3 with prompts: calibration through StableDiffusion3Pipeline.encode_prompt (CLIP-L, CLIP-G and T5), `run
--prompt` writing the decoded image, and svdexport.apply inside StableDiffusion3Pipeline with its classifier-free
guidance (the negative and positive rows in one transformer call) against the uncached pipeline. All on the tiny
pipeline of tiny_sd3_pipeline.py (real classes, built offline)."""

import json

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image

import svdexport
from helpers import Recording, assert_one_line_error, run_cli
from svdexport.cli import main
from svdexport.errors import SvdExportError
from svdexport.models.sd3 import SD3
from tiny_sd3_pipeline import CALL, CLIP_TOKENS, PROMPTS, SHAPES, tiny_sd3_pipeline

BUILD = ["--model", "sd3", "--k-max", "16", "--granularity", "block", "--height", "128", "--width", "128",
         "--text-len", str(SHAPES["text_len"]), "--calib-samples", "2", "--calib-steps", "4", "--dtype", "fp32"]
PARTS = {"text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3", "vae"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A whole SD3 pipeline folder as save_pretrained writes it."""
    root = tmp_path_factory.mktemp("sd3-pipe")
    tiny_sd3_pipeline().save_pretrained(root)
    return root


def build(folder, out, *argv):
    assert main(["build", "--weights", str(folder), "--out", str(out), *BUILD, *map(str, argv)]) == 0
    return out


@pytest.fixture(scope="module")
def engine_dir(folder, tmp_path_factory):
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    return build(folder, tmp_path_factory.mktemp("sd3-eager") / "engine", "--calibration-prompts", prompts)


@pytest.fixture(scope="module")
def engine(engine_dir):
    return svdexport.load(engine_dir)


def pipe_call(pipe, steps=8, prompt=PROMPTS[0], seed=1, **kw):
    """Decoded images [B, 3, H, W] in [0, 1]."""
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                output_type="pt", **{**CALL, **kw}).images


def test_build_calibrates_on_the_pipelines_prompts(folder, engine_dir):
    """The rows are StableDiffusion3Pipeline.encode_prompt's: CLIP's 8 tokens then T5's 8."""
    m = json.loads((engine_dir / "manifest.json").read_text())
    assert m["model"]["family"] == "sd3" and m["model"]["conditioning"] == {
        "kind": "pipeline", "calibration_prompts": PROMPTS[:2]}
    assert PARTS <= set(m["model"]["pipeline_parts"])
    rows = SD3.prompts.encode(SD3.inspect(str(folder)), PROMPTS[:2], SHAPES["text_len"], torch.float32, "cpu")
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, transformer=None, vae=None)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS[1], None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=SHAPES["text_len"] - CLIP_TOKENS)
    # (the pipeline here keeps autograd on: its attention may take another kernel, so not bit for bit)
    assert torch.allclose(rows["encoder_hidden_states"][1:], embeds, rtol=0, atol=1e-5)
    assert torch.allclose(rows["pooled_projections"][1:], pooled, rtol=0, atol=1e-5)
    with pytest.raises(SvdExportError, match="leaves no T5 tokens"):
        SD3.prompts.encode(SD3.inspect(str(folder)), PROMPTS[:1], CLIP_TOKENS, torch.float32, "cpu")


def test_run_prompt_writes_the_image(engine_dir, tmp_path, capsys):
    code, stdout, err = run_cli(capsys, "run", engine_dir, "--prompt", PROMPTS[0], "--steps", "8",
                                "--out", tmp_path / "fox.png")
    assert code == 0, err
    assert Image.open(tmp_path / "fox.png").size == (128, 128)  # decoded by the folder's VAE
    assert "8 steps:" in stdout
    code, _, err = run_cli(capsys, "run", engine_dir, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "give --prompt")


def test_cfg_in_one_call_matches_the_uncached_pipeline_and_keeps_one_cache_per_half(folder, engine):
    """StableDiffusion3Pipeline joins the negative and positive rows in one transformer call; a batch-1 engine
    runs them as two passes with their own cache state. Every step in full, the decoded images equal the
    uncached pipeline's; cached, the halves keep apart states and each equals the engine's own step cache."""
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    reference = pipe_call(pipe, guidance_scale=5.0)
    assert (pipe_call(svdexport.apply(pipe, engine, interval=1), guidance_scale=5.0) - reference).abs().max() <= 1e-4
    pipe = svdexport.apply(StableDiffusion3Pipeline.from_pretrained(folder), engine)
    recording = Recording(engine)
    engine.step_cache = recording
    try:
        cached = pipe_call(pipe, guidance_scale=5.0)
    finally:
        del engine.step_cache
    caches = pipe.transformer._caches
    assert set(caches) == {"cond", "uncond"} and caches["cond"] is not caches["uncond"]
    assert pipe.transformer.plan_of_last_call() == engine.plan(8).mask and not all(engine.plan(8).mask)
    assert [i for i, _, _ in recording.steps] == [i for i in range(8) for _ in "uc"]  # uncond, then cond
    own = {half: engine.step_cache(8) for half in "uc"}
    for k, (i, inputs, out) in enumerate(recording.steps):
        assert inputs["hidden_states"].shape[0] == 1 and torch.equal(own["uc"[k % 2]](i, inputs), out)
    assert not torch.equal(recording.steps[-2][2], recording.steps[-1][2])
    assert not torch.equal(cached, reference)  # the cached steps forecast instead of computing


def test_a_batch_2_engine_takes_the_joined_call_as_it_is(folder, tmp_path):
    """An engine that serves the call's 2 rows runs them in one pass (one cache state: the rows are apart in
    it anyway) and matches the uncached pipeline every step in full."""
    engine = svdexport.load(build(folder, tmp_path / "engine", "--batch", "2"))
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    reference = pipe_call(pipe, guidance_scale=5.0)
    assert (pipe_call(svdexport.apply(pipe, engine, interval=1), guidance_scale=5.0) - reference).abs().max() <= 1e-4
    assert set(pipe.transformer._caches) == {"cond"}
    with pytest.raises(SvdExportError, match="skip_guidance_layers"):
        pipe_call(pipe, guidance_scale=5.0, skip_guidance_layers=[1])


def test_an_sd3_lora_goes_into_the_engine(engine, tmp_path):
    """A LoRA saved by StableDiffusion3Pipeline, loaded into the engine through SD3's diffusers loader, equals the
    transformer with it fused; unloading gives the base output bit for bit."""
    from peft import LoraConfig, get_peft_model_state_dict

    model = SD3.load(SD3.inspect(engine.manifest.model.weights.source), engine.dtype)
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "proj_out"]))
    state = {k: v * 0.5 for k, v in get_peft_model_state_dict(model).items()}
    StableDiffusion3Pipeline.save_lora_weights(tmp_path, transformer_lora_layers=state, weight_name="l.safetensors")
    model.unload_lora()
    model.load_lora_adapter(str(tmp_path / "l.safetensors"), prefix="transformer")
    model.fuse_lora()
    fused_full, _ = SD3.graphs(model, engine.cache.granularity)
    state = {**engine.example_inputs(5), "bases": engine.sampler.bases, "timestep": torch.tensor([410.0])}
    inputs = [state[n] for n in engine.full.input_names]
    base = engine.full(*inputs)[0]
    engine.load_lora(tmp_path / "l.safetensors")
    try:
        with torch.no_grad():
            got, want = engine.full(*inputs)[0], fused_full(*inputs)[0]
        assert (got - base).abs().max() > 1e-2 * want.abs().max() and torch.allclose(got, want, atol=1e-6)
    finally:
        engine.unload_lora()
    assert torch.equal(engine.full(*inputs)[0], base)
