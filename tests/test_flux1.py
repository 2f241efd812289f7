"""The FLUX.1 path: pipeline folders with text encoders, schnell defaults, memory checks, float64-free graphs."""

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from helpers import TINY, tiny_model
from svdexport.cli import main
from svdexport.models import flux
from svdexport.models.flux import FLUX
from svdexport.builder import memory
from helpers import assert_one_line_error, run_cli
from tiny_pipeline import tiny_pipeline

pytestmark = pytest.mark.slow  # engines of every backend or whole pipelines: the full suite only

FAST = ["--calib-samples", "2", "--calib-steps", "4", "--height", "128", "--width", "128", "--text-len", "8"]
# FLUX.1-dev's transformer config (black-forest-labs/FLUX.1-dev, transformer/config.json).
FLUX1_DEV = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 19,
             "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
             "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
             "axes_dims_rope": [16, 56, 56]}


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """A whole FLUX pipeline folder: transformer, VAE, scheduler, CLIP and T5 encoders with tokenizers."""
    root = tmp_path_factory.mktemp("flux-pipe")
    tiny_pipeline(text_encoders=True).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def text_engine(text_folder, tmp_path_factory):
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    prompts.write_text("# two prompts\na red cat\n\na blue house on a hill\n")
    out = tmp_path_factory.mktemp("eng") / "engine"
    assert main(["build", "--weights", str(text_folder), "--out", str(out), "--calibration-prompts", str(prompts),
                 *FAST]) == 0
    return out


def test_calibration_uses_the_pipelines_text_encoders(text_engine):
    m = json.loads((text_engine / "manifest.json").read_text())
    assert m["model"]["conditioning"] == {"kind": "pipeline", "calibration_prompts": ["a red cat",
                                                                                      "a blue house on a hill"]}
    assert {"text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"} <= set(m["model"]["pipeline_parts"])
    assert m["calibration"]["num_inputs"] == 2


def test_run_prompt_goes_through_the_whole_pipeline(text_engine, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code, stdout, err = run_cli(capsys, "run", text_engine, "--prompt", "a red cat", "--steps", "12", "--out", out)
    assert code == 0, err
    assert Image.open(out).size == (128, 128)  # decoded by the folder's VAE
    assert "12 steps: 4 full, 8 cached" in stdout  # warmup 3, interval 7


def test_prompt_errors(text_engine, text_folder, tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", text_engine, "--prompt", "a", "--prompt", "b", "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "built for batch 1")
    code, _, err = run_cli(capsys, "run", text_engine, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "give --prompt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    code, _, err = run_cli(capsys, "calibrate", "--weights", text_folder, "--calibration-prompts", empty,
                           "--out", tmp_path / "b.safetensors", *FAST)
    assert_one_line_error(code, err, "has no prompts")
    assert not (tmp_path / "b.safetensors").exists()


def test_prompt_needs_text_encoders(tmp_path, capsys):
    folder = tmp_path / "bare"
    tiny_model(guidance=True).save_pretrained(folder / "transformer")
    out = tmp_path / "e"
    assert run_cli(capsys, "build", "--weights", folder, "--out", out, *FAST)[0] == 0
    code, _, err = run_cli(capsys, "run", out, "--prompt", "a cat", "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "text encoders", "no text_encoder")
    code, _, err = run_cli(capsys, "build", "--weights", folder, "--out", tmp_path / "f",
                           "--calibration-prompts", tmp_path / "p.txt", *FAST)
    assert_one_line_error(code, err, "needs text encoders")


def test_schnell_gets_four_steps_and_warmup_one(tmp_path, capsys):
    """A model without guidance input whose scheduler has no resolution shift is schnell-like."""
    folder = tmp_path / "schnell"
    tiny_model(guidance=False).save_pretrained(folder / "transformer")
    FlowMatchEulerDiscreteScheduler.from_config(flux.SCHNELL_SAMPLER_CONFIG).save_pretrained(folder / "scheduler")
    out = tmp_path / "e"
    assert run_cli(capsys, "build", "--weights", folder, "--out", out, "--calib-samples", "1", "--height", "128",
                   "--width", "128", "--text-len", "8")[0] == 0
    m = json.loads((out / "manifest.json").read_text())
    assert (m["steps"], m["cache"]["warmup"], m["cache"]["interval"]) == (4, 1, 2)
    assert m["calibration"]["num_timesteps"] == 4 and m["sampler"]["use_dynamic_shifting"] is False
    code, stdout, _ = run_cli(capsys, "run", out, "--out", tmp_path / "s.png")
    assert code == 0 and "4 steps: 2 full, 2 cached" in stdout


def test_full_depth_flux1_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "FLUX.1-dev" / "transformer"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(FLUX1_DEV))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"never read")  # loading it would fail
    monkeypatch.setattr(memory, "available_bytes", lambda device: 24 * memory.GiB)
    code, _, err = run_cli(capsys, "build", "--weights", folder.parent, "--backend", "aoti", "--dtype", "bf16",
                           "--out", tmp_path / "e")
    assert_one_line_error(code, err, "needs about", "11.9B parameters", "22.2 GiB of weights", "24.0 GiB available")
    assert not (tmp_path / "e").exists()


def test_memory_estimate_counts_parameters_exactly():
    assert FLUX.parameters(FLUX1_DEV) == 11_901_408_320  # FLUX.1-dev's published 12B
    model = tiny_model()
    assert FLUX.parameters(dict(model.config)) == sum(p.numel() for p in model.parameters())


def test_exported_full_graph_has_no_float64(tmp_path):
    """diffusers computes FLUX's rotary table in float64; the engines get it as a float32 input instead."""
    model = tiny_model(guidance=True)
    full, _ = FLUX.graphs(model, "final")
    inputs = FLUX.example_inputs(dict(model.config), flux.FluxShapes(height=128, width=128, text_len=8), seed=0)
    state = {**inputs, "timestep": torch.tensor([0.5]), "bases": torch.zeros(1, 64, 8)}
    program = torch.export.export(full, tuple(state[n] for n in full.input_names), strict=False)
    dtypes = {n.meta["val"].dtype for n in program.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)}
    assert torch.float64 not in dtypes and torch.float32 in dtypes
    assert TINY["axes_dims_rope"] and inputs["rotary_cos"].dtype == torch.float32


def test_example_pipeline_script(text_folder, text_engine, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "scripts/example_pipeline.py", str(text_folder), str(text_engine),
                           "a red cat", "--steps", "5", "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "3 full + 2 cached steps" in proc.stdout and Image.open(tmp_path / "0.png").size == (128, 128)
