"""HunyuanVideo with prompts: calibration through HunyuanVideoPipeline.encode_prompt, `run --prompt` writing
the decoded video, and svdexport.apply inside HunyuanVideoPipeline against the uncached pipeline and the
engine's own step cache. All on the tiny pipeline of tiny_video_pipeline.py (real classes, built offline)."""

import importlib.util
import json

import pytest
import torch
from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
from peft import LoraConfig, get_peft_model_state_dict
from PIL import Image

import svdexport
from helpers import Recording, assert_one_line_error, run_cli
from svdexport.cli import main
from svdexport.errors import SvdExportError
from svdexport.models.family import Conditioning
from svdexport.models.hunyuanvideo import HUNYUANVIDEO as HV
from svdexport.models.hunyuanvideo import VideoShapes
from svdexport.models.weights import read_prompts
from tiny_video_pipeline import CALL, PROMPTS, SHAPES, TRANSFORMER, tiny_video_pipeline, transformer

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
BUILD = ["--model", "hunyuanvideo", "--k-max", "16", "--frames", "9", "--height", "64", "--width", "64", "--text-len", "8",
         "--calib-samples", "2", "--calib-steps", "4"]
PARTS = {"text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A whole HunyuanVideo pipeline folder as save_pretrained writes it."""
    root = tmp_path_factory.mktemp("hv-pipe")
    tiny_video_pipeline().save_pretrained(root)
    return root


def build(folder, out, *argv):
    code = main(["build", "--weights", str(folder), "--out", str(out), "--graphs",
                               str(out.parent / "graphs"), *BUILD, *map(str, argv)])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def engine_dir(folder, tmp_path_factory):
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    prompts.write_text("# two prompts\n" + "\n".join(PROMPTS[:2]) + "\n")
    return build(folder, tmp_path_factory.mktemp("hv-eager") / "engine", "--calibration-prompts", prompts)


@pytest.fixture(scope="module")
def engine(engine_dir):
    return svdexport.load(engine_dir)


def pipe_call(pipe, steps=10, prompt=PROMPTS[0], seed=1, **kw):
    """Decoded frames [B, F, 3, H, W] in [0, 1]."""
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                output_type="pt", **{**CALL, **kw}).frames


def test_example_inputs_take_the_encoded_rows_and_their_mask():
    """Calibration inputs from a table of encoded prompts: rows seed, seed+1, ... with their text masks."""
    config = dict(transformer().config)
    shapes = VideoShapes(batch=2, **SHAPES)
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3, [1] * 2 + [0] * 6])
    table = {"encoder_hidden_states": torch.randn(3, 8, 32, generator=g), "pooled_projections": torch.randn(3, 16),
             "encoder_attention_mask": mask}
    x = HV.example_inputs(config, shapes, seed=2, conditioning=Conditioning(table))
    assert torch.equal(x["encoder_hidden_states"], table["encoder_hidden_states"][[2, 0]])
    assert torch.equal(x["pooled_projections"], table["pooled_projections"][[2, 0]])
    assert torch.equal(x["encoder_attention_mask"], mask[[2, 0]]) and x["encoder_attention_mask"].dtype == torch.int64
    assert x["hidden_states"].shape == (2, 4, 3, 8, 8) and torch.equal(x["guidance"], torch.full((2,), 6000.0))
    synthetic = HV.example_inputs(config, shapes, seed=2)
    assert torch.equal(synthetic["hidden_states"], x["hidden_states"])  # same seeded noise either way


@pytest.mark.slow
def test_build_calibrates_on_the_pipelines_prompts(folder, engine_dir):
    m = json.loads((engine_dir / "manifest.json").read_text())
    assert m["model"]["family"] == "hunyuanvideo"
    assert m["model"]["conditioning"] == {"kind": "pipeline", "calibration_prompts": PROMPTS[:2]}
    assert PARTS <= set(m["model"]["pipeline_parts"]) and m["calibration"]["num_inputs"] == 2
    # The rows are HunyuanVideoPipeline.encode_prompt's, under its default template: the tiny tokenizer
    # splits as Llama 3's, so the template's 95 tokens are cropped and the prompt's own remain, padded.
    info = HV.inspect(str(folder))
    rows = HV.prompts.encode(info, PROMPTS[:2], 8, torch.float32, "cpu")
    pipe = HunyuanVideoPipeline.from_pretrained(folder, transformer=None, vae=None)
    embeds, pooled, mask = pipe.encode_prompt(PROMPTS[1], max_sequence_length=8, device="cpu")
    assert torch.equal(rows["encoder_hidden_states"][1:], embeds) and torch.equal(rows["pooled_projections"][1:], pooled)
    # "a lighthouse in a storm": 5 words and <|eot_id|>, then 2 padding tokens; the first prompt fills all 8.
    assert rows["encoder_attention_mask"].tolist() == [[1] * 8, [1] * 6 + [0] * 2]
    assert torch.equal(mask, rows["encoder_attention_mask"][1:])


@pytest.mark.slow
def test_default_build_uses_the_builtin_prompts(folder, tmp_path):
    out = tmp_path / "e"
    assert main(["build", "--weights", str(folder), "--out", str(out), *BUILD[:-4],
                               "--calib-samples", "1", "--calib-steps", "2"]) == 0
    cond = json.loads((out / "manifest.json").read_text())["model"]["conditioning"]
    assert cond == {"kind": "pipeline", "calibration_prompts": read_prompts(None)}


@pytest.mark.slow
def test_run_prompt_writes_the_video(engine_dir, tmp_path, capsys):
    code, stdout, err = run_cli(capsys, "run", engine_dir, "--prompt", PROMPTS[0], "--steps", "10",
                                "--out", tmp_path / "fox.gif")
    assert code == 0, err
    gif = Image.open(tmp_path / "fox.gif")
    assert gif.n_frames == SHAPES["frames"] and gif.size == (64, 64)  # decoded by the folder's VAE: 9 frames
    assert Image.open(tmp_path / "fox.png").size == (9 * 64, 64)  # the frame grid: one row of 9 frames
    assert "10 steps: 2 full, 8 cached" in stdout  # warmup 1, interval 6: steps 0 and 6
    code, _, err = run_cli(capsys, "run", engine_dir, "--prompt", "a", "--prompt", "b", "--out", tmp_path / "x.gif")
    assert_one_line_error(code, err, "built for batch 1")
    code, _, err = run_cli(capsys, "run", engine_dir, "--out", tmp_path / "x.gif")
    assert_one_line_error(code, err, "give --prompt")


BACKENDS = ["eager", pytest.param("onnx", marks=pytest.mark.skipif(not HAS_ONNX, reason="onnx extra not installed"))]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_interval_1_matches_the_uncached_pipeline(folder, engine, tmp_path, backend):
    if backend != "eager":
        engine = svdexport.load(build(folder, tmp_path / "engine", "--backend", backend))
    pipe = HunyuanVideoPipeline.from_pretrained(folder)
    reference = pipe_call(pipe)
    svdexport.apply(pipe, engine, interval=1)
    got = pipe_call(pipe)
    # Decoded frames in [0, 1] through the real VAE. The engine gets the pipeline's float text mask as the
    # int64 it was built with; everything else is the same computation (eager) or its ONNX Runtime form.
    assert got.shape == reference.shape == (1, 9, 3, 64, 64)
    assert (got - reference).abs().max() <= 1e-4


@pytest.mark.slow
def test_loras_loaded_after_apply_reach_the_engine(folder, engine, tmp_path):
    """HunyuanVideoPipeline's LoRA loader reaches the engine's stand-in as FLUX's does (test_pipeline.py)."""
    model = transformer()
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "proj_out"]))
    state = {k: v * 0.5 for k, v in get_peft_model_state_dict(model).items()}
    HunyuanVideoPipeline.save_lora_weights(tmp_path, transformer_lora_layers=state, weight_name="hv.safetensors")
    reference = HunyuanVideoPipeline.from_pretrained(folder)
    pipe = svdexport.apply(HunyuanVideoPipeline.from_pretrained(folder), engine, interval=1)
    base = pipe_call(pipe, steps=6)
    try:
        for p in (reference, pipe):
            p.load_lora_weights(str(tmp_path / "hv.safetensors"), adapter_name="style")
            p.set_adapters(["style"], adapter_weights=[0.7])
        want = pipe_call(reference, steps=6)  # diffusers with the PEFT adapter active
        assert (want - base).abs().max() > 1e-2
        assert (pipe_call(pipe, steps=6) - want).abs().max() <= 1e-4
        pipe.unload_lora_weights()
        assert torch.equal(pipe_call(pipe, steps=6), base)
    finally:
        engine.unload_lora()  # the module's engine: base weights for the other tests, whatever happened


@pytest.mark.slow
def test_cached_pipeline_equals_the_engines_own_step_cache(folder, engine):
    pipe = svdexport.apply(HunyuanVideoPipeline.from_pretrained(folder), engine)
    recording = Recording(engine)
    engine.step_cache = recording
    try:
        cached = pipe_call(pipe, steps=12)
    finally:
        del engine.step_cache
    assert [i for i, _, _ in recording.steps] == list(range(12))
    assert pipe.transformer.plan_of_last_call() == engine.plan(12).mask  # the engine's plan for 12 steps
    _, inputs, _ = recording.steps[0]
    assert inputs["encoder_attention_mask"].dtype == torch.int64 and inputs["guidance"].tolist() == [6000.0]
    own = engine.step_cache(12)
    for i, inputs, out in recording.steps:
        assert torch.equal(own(i, inputs), out)
    full = pipe_call(svdexport.apply(HunyuanVideoPipeline.from_pretrained(folder), engine, interval=1), steps=12)
    assert not torch.equal(cached, full)  # the cached steps forecast instead of computing


@pytest.mark.slow
def test_true_cfg_keeps_one_cache_per_context(folder, engine):
    cfg = dict(true_cfg_scale=2.0, negative_prompt=PROMPTS[2])
    pipe = HunyuanVideoPipeline.from_pretrained(folder)
    reference = pipe_call(pipe, **cfg)
    assert (pipe_call(svdexport.apply(pipe, engine, interval=1), **cfg) - reference).abs().max() <= 1e-4
    pipe = svdexport.apply(HunyuanVideoPipeline.from_pretrained(folder), engine)
    pipe_call(pipe, **cfg)
    caches = pipe.transformer._caches
    assert set(caches) == {"cond", "uncond"} and caches["cond"] is not caches["uncond"]
    assert not torch.equal(caches["cond"].state["residuals"], caches["uncond"].state["residuals"])


@pytest.mark.slow
def test_smaller_batch_is_padded_and_larger_refused(folder, tmp_path):
    engine = svdexport.load(build(folder, tmp_path / "engine", "--batch", "2", "--calibration-prompts",
                                  _prompt_file(tmp_path)))
    pipe = HunyuanVideoPipeline.from_pretrained(folder)
    reference = pipe_call(pipe, steps=6, prompt=PROMPTS[1])  # 2 padding tokens: its mask is padded too
    svdexport.apply(pipe, engine, interval=1)
    assert (pipe_call(pipe, steps=6, prompt=PROMPTS[1]) - reference).abs().max() <= 1e-4
    assert pipe_call(pipe, steps=2, prompt=PROMPTS[:2]).shape[0] == 2
    with pytest.raises(SvdExportError, match="3 videos per step .* built for batch 2"):
        pipe_call(pipe, steps=2, prompt=PROMPTS)


def _prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.mark.slow
def test_mismatched_requests_are_refused(folder, engine):
    pipe = svdexport.apply(HunyuanVideoPipeline.from_pretrained(folder), engine)
    with pytest.raises(SvdExportError, match="takes no attention_kwargs"):
        pipe_call(pipe, steps=2, attention_kwargs={"scale": 0.5})
    with pytest.raises(SvdExportError, match="256 tokens; this engine was built for 8: .*max_sequence_length=8"):
        pipe_call(pipe, steps=2, max_sequence_length=256)
    with pytest.raises(SvdExportError, match="hidden_states.*built for"):
        pipe_call(pipe, steps=2, num_frames=5)
    with pytest.raises(SvdExportError, match="built for"):
        pipe_call(pipe, steps=2, height=128)
    other = HunyuanVideoPipeline.from_pretrained(folder)
    other.transformer = HunyuanVideoTransformer3DModel(**{**TRANSFORMER, "num_single_layers": 1})
    with pytest.raises(SvdExportError, match="differs from the pipeline's transformer .num_single_layers"):
        svdexport.apply(other, engine)
