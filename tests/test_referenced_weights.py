"""AOTInductor and Inductor engines that reference the user's checkpoint (issue 25): packages and programs
without weights, the weights bound at load from the mapped checkpoint, found again when it moves, refused when a
byte changed; LoRAs fused onto referenced weights; a single file in Black Forest Labs' layout referenced
through diffusers' own converter.

One small FLUX-shaped model saved as a local diffusers folder in fp32 (the tests' dtype)."""

import json
import shutil

import pytest
import torch
from diffusers import FluxTransformer2DModel

import svdexport
from helpers import FAST, assert_one_line_error, make_lora, plain_diffusers_loop, run_cli
from svdexport import tensorfile
from svdexport.cli import main
from svdexport.errors import SvdExportError

CONFIG = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=64,
              num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
              axes_dims_rope=(8, 28, 28))
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return FluxTransformer2DModel(**CONFIG).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def referenced(tmp_path_factory, model):
    """(checkpoint folder, aoti engine) built from a local folder."""
    root = tmp_path_factory.mktemp("aoti-referenced")
    folder = root / "checkpoint"
    model.save_pretrained(folder / "transformer")
    tensorfile.write(folder / WEIGHTS, model.state_dict())
    assert main(["build", "--weights", str(folder), "--backend", "aoti", "--out", str(root / "engine"),
                 "--graphs", str(root / "graphs"), *FAST, "--calib-steps", "2"]) == 0
    return folder, root / "engine"


def folder_bytes(folder):
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_no_weight_is_copied_and_the_engine_matches_eager(referenced, model):
    folder, engine = referenced
    weight_bytes = (folder / WEIGHTS).stat().st_size
    graphs = engine.parent / "graphs"
    # The graph folder's programs keep no weight either (their state dicts are on the meta device).
    assert folder_bytes(graphs) < 0.5 * weight_bytes and (engine / "constants.safetensors").stat().st_size < 1024
    program = torch.export.load(str(graphs / "full.pt2"))
    assert all(t.is_meta for t in program.state_dict.values())
    m = json.loads((engine / "manifest.json").read_text())
    assert [r["size"] for r in m["bound"]["referenced"]] == [weight_bytes]
    with svdexport.load(engine) as e:
        x = e.example_inputs(seed=2)
        got = e.generate(x, steps=4, interval=1).latents
    assert (got - plain_diffusers_loop(model, x, 4, e.shapes)).abs().max() <= 1e-5


def test_a_moved_checkpoint_is_found_by_its_hash_and_a_changed_byte_refused(referenced, tmp_path, capsys):
    folder, engine = referenced
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    code, _, err = run_cli(capsys, "run", engine, "--weights", tmp_path / "nowhere", "--out", tmp_path / "a.png")
    assert_one_line_error(code, err, "--weights", "no such file")
    with svdexport.load(engine, weights=moved) as e:  # a folder: its files matched by size and sha256
        e.generate(steps=2, interval=1)
    with svdexport.load(engine, weights=moved / WEIGHTS):  # or the file itself
        pass
    with open(moved / WEIGHTS, "r+b") as f:  # one byte of the data changed, the size the same
        f.seek(-7, 2)
        byte = f.read(1)
        f.seek(-7, 2)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(SvdExportError, match="sha256") as e:
        svdexport.load(engine, weights=moved)
    assert "\n" not in str(e.value)


def test_a_lora_on_referenced_weights_matches_fusing_and_unloads_bit_for_bit(referenced, model, tmp_path):
    folder, engine = referenced
    lora = make_lora(tmp_path / "lora.safetensors", model)
    with svdexport.load(engine) as e:
        x = e.example_inputs(seed=3)
        base = e.generate(x, steps=3, interval=1).latents
        e.load_lora(lora, scale=0.7)
        fused = FluxTransformer2DModel(**CONFIG).eval().requires_grad_(False)
        fused.load_state_dict(model.state_dict())
        fused.load_lora_adapter(str(lora), prefix="transformer")
        fused.fuse_lora(lora_scale=0.7)
        got = e.generate(x, steps=3, interval=1).latents
        assert (got - plain_diffusers_loop(fused, x, 3, e.shapes)).abs().max() <= 1e-5
        e.unload_lora()
        assert torch.equal(e.generate(x, steps=3, interval=1).latents, base)
    assert json.loads((engine / "manifest.json").read_text())["bound"]["referenced"]  # the checkpoint untouched


def test_a_bfl_conversion_keeps_each_part_of_a_fused_matrix_a_view_of_the_file(tmp_path):
    """diffusers' BFL converter copies each part of a fused qkv matrix with torch.cat([part]); under the loader's
    mode that one-tensor concatenation is the part itself, still a view of the mapped file (so an engine
    references it), while a real concatenation still copies. (The converter itself hard-codes FLUX.1's 3072
    width, too large for this suite; scripts/measure_full_size.py's checkpoints are in diffusers' layout.)"""
    from svdexport.models.mapped import SingleCatAsView
    from svdexport.tensorfile import MappedFile, origins_of

    tensorfile.write(tmp_path / "f.safetensors", {"qkv": torch.randn(6, 4), "other": torch.randn(2, 4)})
    f = MappedFile(tmp_path / "f.safetensors")
    qkv, other = f.tensor("qkv"), f.tensor("other")
    with SingleCatAsView():
        q, k, v = (torch.cat([part]) for part in torch.chunk(qkv, 3, dim=0))
        joined = torch.cat([q, other])
    where = origins_of({"q": q, "k": k, "v": v, "joined": joined}, [f])
    assert set(where) == {"q", "k", "v"} and where["k"].offset == where["q"].offset + q.numel() * 4
    assert torch.equal(torch.cat([q, k, v]), qkv) and torch.equal(joined, torch.cat([qkv[:2], other]))
