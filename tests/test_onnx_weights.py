"""ONNX engines that reference the user's checkpoint (issue 25): the models take their weights as graph inputs
without their bytes, the sessions read them in place from the mapped checkpoint; bf16 weights on a CPU compute
in float32.

One small FLUX-shaped model (3 heads of 128, one block of each kind: the weights outweigh the graph files), saved
as a local diffusers folder in bf16: an onnx engine referencing it, and an fp32 one built with --embed-weights."""

import importlib.util
import json
import shutil

import onnx
import pytest
import torch
from diffusers import FluxTransformer2DModel

import svdexport
from helpers import FAST, assert_one_line_error, graph_inputs, make_lora, plain_diffusers_loop, run_cli
from svdexport import tensorfile
from svdexport.builder import precision
from svdexport.cli import main
from svdexport.errors import SvdExportError
from svdexport.export import onnx as onnx_backend
from svdexport.files import sha256_file

pytestmark = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")),
                                reason="onnx extra not installed")

CONFIG = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
              num_attention_heads=3, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
              axes_dims_rope=(16, 56, 56))
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def save_folder(folder, model, dtype):
    model.save_pretrained(folder / "transformer")  # config.json; the weights rewritten in `dtype`
    tensorfile.write(folder / WEIGHTS, {k: v.to(dtype) for k, v in model.state_dict().items()})
    return folder


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FluxTransformer2DModel(**CONFIG).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def referenced(tmp_path_factory, model):
    """(checkpoint folder, engine) of a bf16 checkpoint built with --dtype bf16: bf16 weights, float32 compute."""
    root = tmp_path_factory.mktemp("onnx-referenced")
    folder = save_folder(root / "checkpoint", model, torch.bfloat16)
    assert main(["build", "--weights", str(folder), "--backend", "onnx", "--dtype", "bf16", "--out", str(root / "engine"),
                 "--graphs", str(root / "graphs"), *FAST]) == 0
    return folder, root / "engine"


def folder_bytes(folder):
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_the_engine_references_the_checkpoint_and_neither_folder_holds_its_weights(referenced):
    folder, engine = referenced
    checkpoint = folder / WEIGHTS
    weight_bytes = checkpoint.stat().st_size
    assert folder_bytes(engine) + folder_bytes(engine.parent / "graphs") < 0.1 * weight_bytes
    m = json.loads((engine / "manifest.json").read_text())
    assert m["bound"]["referenced"] == [{"path": str(checkpoint.resolve()), "sha256": sha256_file(checkpoint),
                                         "size": weight_bytes}]
    bindings = json.loads((engine / "bindings.json").read_text())
    for name in ("full", "cached"):
        for model_dir in (engine, engine.parent / "graphs"):
            proto = onnx.load(str(model_dir / f"{name}.onnx"))
            # Every weight the graph reads is a bf16 graph input named by its FQN; no initializer holds one.
            weights = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
            assert set(bindings["located"][name]) <= set(weights)
            assert {weights[n] for n in bindings["located"][name]} == {onnx.TensorProto.BFLOAT16}
            assert sum(len(t.raw_data) for t in proto.graph.initializer) < 4096
    assert not list(engine.glob("*.data")) and not list((engine.parent / "graphs").glob("*.data"))


def test_bf16_weights_compute_in_float32_as_eager_float32_from_the_same_weights(referenced):
    _, folder = referenced
    engine = svdexport.load(folder)
    options = engine.manifest.backend_options
    assert engine.manifest.dtype == "bfloat16" and options["compute"] == "float32"
    assert options["input_dtypes"]["full"][0] == "float32" and engine.manifest.graphs["full"].input_dtypes[0] == "bfloat16"
    eager32, eager16 = engine.eager_reference(torch.float32), engine.eager_reference()
    with torch.no_grad():
        for name in ("full", "cached"):
            inputs = [t.float() if t.is_floating_point() else t for t in graph_inputs(engine, name)]
            got = getattr(engine, name)(*inputs)
            want32 = getattr(eager32, name)(*inputs)
            want16 = getattr(eager16, name)(*[t.bfloat16() if t.dtype == torch.float32 and d == "bfloat16" else t
                                               for t, d in zip(inputs, engine.manifest.graphs[name].input_dtypes)])
            got, want32, want16 = [x if isinstance(x, tuple) else (x,) for x in (got, want32, want16)]
            for a, b, c in zip(got, want32, want16):
                assert a.dtype == torch.float32
                assert (a - b).abs().max() <= 1e-4 * b.abs().max(), name  # the same float32 math (2e-6 measured)
                # Eager bf16 rounds every activation to 8 mantissa bits: loose (4.5e-2 of the output scale measured
                # on the full graph's noise_pred here; any bf16 CPU rounds as coarsely).
                assert (a - c.float()).abs().max() <= 0.2 * c.float().abs().max(), name


def test_it_matches_eager_at_interval_one(referenced):
    _, folder = referenced
    engine = svdexport.load(folder)
    eager32 = engine.eager_reference(torch.float32)
    inputs = eager32.example_inputs(seed=5)
    got = engine.generate(inputs, steps=8, interval=1).latents
    want = eager32.generate(inputs, steps=8, interval=1).latents
    assert (got.float() - want).abs().max() <= 1e-4 * want.abs().max()


def test_it_loads_from_where_the_checkpoint_moved_and_refuses_a_changed_byte_before_any_work(referenced, tmp_path,
                                                                                            capsys, monkeypatch):
    folder, engine = referenced
    with svdexport.load(engine) as e:
        inputs = graph_inputs(e, "full")
        want = e.full(*inputs)
    moved = shutil.copytree(folder, tmp_path / "moved")
    folder.rename(folder.with_name("away"))
    try:
        with pytest.raises(SvdExportError, match="missing; give the checkpoint's new place with --weights"):
            svdexport.load(engine)
        with svdexport.load(engine, weights=moved) as e:
            assert all(torch.equal(a, b) for a, b in zip(e.full(*inputs), want))
    finally:
        folder.with_name("away").rename(folder)
    changed = shutil.copytree(folder, tmp_path / "changed")
    with open(changed / WEIGHTS, "r+b") as f:
        f.seek(-3, 2)
        byte = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([byte[0] ^ 0x01]))

    def no_session(*args, **kwargs):
        raise AssertionError("an ONNX Runtime session was made before the weights were verified")

    monkeypatch.setattr(onnx_backend.OrtGraph, "__init__", no_session)
    code, _, err = run_cli(capsys, "run", engine, "--weights", changed, "--steps", 2, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "corrupted", "sha256")


def test_a_lora_replaces_referenced_weights_and_unloads_to_them(referenced, model, tmp_path):
    _, folder = referenced
    engine = svdexport.load(folder)
    base = engine.cached(*graph_inputs(engine, "cached"))
    adapted = FluxTransformer2DModel(**CONFIG).eval()
    adapted.load_state_dict(model.state_dict())
    engine.load_lora(make_lora(tmp_path / "lora.safetensors", adapted, targets=["proj_out"]), scale=0.8)
    eager = engine.eager_reference(torch.float32)  # the same LoRA, fused by diffusers in bf16
    inputs = [t.float() if t.is_floating_point() else t for t in graph_inputs(engine, "cached")]
    with torch.no_grad():
        got, want = engine.cached(*inputs), eager.cached(*inputs)
    assert (got - base).abs().max() > 1e-2 * want.abs().max()  # the LoRA changes the output
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    engine.unload_lora()
    assert torch.equal(engine.cached(*graph_inputs(engine, "cached")), base)


def test_an_embedded_fp32_engine_keeps_its_weights_and_runs_without_the_checkpoint(model, tmp_path):
    folder = save_folder(tmp_path / "checkpoint", model, torch.float32)
    out = tmp_path / "engine"
    assert main(["build", "--weights", str(folder), "--backend", "onnx", "--dtype", "fp32", "--embed-weights",
                 "--out", str(out), "--graphs", str(tmp_path / "graphs"), *FAST]) == 0
    shutil.rmtree(folder)
    engine = svdexport.load(out)
    assert engine.manifest.bound.referenced == [] and "compute" not in engine.manifest.backend_options
    assert (out / "constants.safetensors").stat().st_size > sum(t.numel() * 4 for t in model.state_dict().values())
    inputs = engine.example_inputs(seed=5)
    got = engine.generate(inputs, steps=8, interval=1).latents
    want = plain_diffusers_loop(model, inputs, 8, engine.shapes)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_auto_keeps_fp32_for_onnx_on_a_cpu_and_names_the_bf16_weights_mode():
    dtype, why = precision.auto_dtype("cpu", "onnx", cpu_bf16=lambda: (True, "this CPU has AMX-BF16"))
    assert dtype == "fp32" and "--dtype bf16 keeps bf16 weights and computes in float32" in why
