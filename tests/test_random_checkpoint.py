"""scripts/make_random_checkpoint.py: the streamed random FLUX.1 checkpoint is a folder diffusers loads, holding
exactly the values its per-tensor generators give, with the initialisation it documents."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("make_random_checkpoint", ROOT / "scripts" / "make_random_checkpoint.py")
mrc = importlib.util.module_from_spec(spec)
sys.modules["make_random_checkpoint"] = mrc  # dataclasses look their module up while the script loads
spec.loader.exec_module(mrc)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The tiny preset (1 + 1 blocks) in shards of at most 200 kB, so that the index path is the one loaded."""
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    written = mrc.write_checkpoint(mrc.config_for("tiny"), out, seed=7, max_shard_bytes=200_000)
    return written


def test_diffusers_loads_the_folder_with_the_generators_values(sharded):
    from diffusers import FluxTransformer2DModel

    model, report = FluxTransformer2DModel.from_pretrained(sharded.folder, torch_dtype=torch.bfloat16,
                                                           output_loading_info=True, local_files_only=True)
    assert not any(report[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.config.num_layers == 1 and model.config.num_single_layers == 1
    state = model.state_dict()
    specs = {s.name: s for s in mrc.layout(mrc.meta_model(mrc.config_for("tiny")))}
    assert set(specs) == set(state) and sum(math.prod(s.shape) for s in specs.values()) == sharded.parameters
    for name in ("x_embedder.weight", "transformer_blocks.0.attn.to_q.bias",
                 "single_transformer_blocks.0.proj_out.weight", "transformer_blocks.0.attn.norm_q.weight"):
        want = mrc.tensor_values(specs[name], seed=7)
        assert state[name].dtype == torch.bfloat16 and torch.equal(state[name], want), name
    # nn.Linear's default init: within +-1/sqrt(fan_in), spread over it; RMSNorm weights one
    w = state["single_transformer_blocks.0.proj_out.weight"].float()
    bound = 1 / math.sqrt(w.shape[1])
    assert w.abs().max() <= bound * (1 + 2**-8) and w.abs().max() > 0.9 * bound and abs(w.mean()) < 0.1 * bound
    norm = state["transformer_blocks.0.attn.norm_k.weight"]
    assert torch.equal(norm, torch.ones_like(norm))
    # another seed, other values; the same seed, the same (generated again, not read back)
    assert not torch.equal(mrc.tensor_values(specs["x_embedder.weight"], seed=8), state["x_embedder.weight"])


def test_shards_and_index_are_as_diffusers_writes_them(sharded):
    index = json.loads((sharded.folder / mrc.INDEX_NAME).read_text())
    files = sorted(p.name for p in sharded.folder.glob("*.safetensors"))
    assert len(files) > 1 and files == sorted(sharded.files) and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sharded.bytes
    from safetensors import safe_open

    for name in files:
        path = sharded.folder / name
        raw = path.read_bytes()
        size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + size])
        assert size % 8 == 0 and header.pop("__metadata__") == {"format": "pt"}
        ends = sorted(v["data_offsets"] for v in header.values())
        assert ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:]))  # contiguous, no gaps
        assert 8 + size + ends[-1][1] == len(raw)
        assert len(raw) - 8 - size <= 200_000 or len(header) == 1  # a shard over the limit holds one tensor
        with safe_open(str(path), framework="pt") as f:  # the reference reader agrees
            assert set(f.keys()) == set(header)
    assert json.loads((sharded.folder / "config.json").read_text())["_class_name"] == "FluxTransformer2DModel"


def test_presets_are_flux1_dev_and_its_40_percent_cut():
    dev = mrc.config_for("flux1-dev")
    width = dev["num_attention_heads"] * dev["attention_head_dim"]
    assert (dev["num_layers"], dev["num_single_layers"], width) == (19, 38, 3072)
    specs = mrc.layout(mrc.meta_model(dev))  # meta: nothing allocated
    assert sum(math.prod(s.shape) for s in specs) == pytest.approx(11.90e9, rel=1e-3)
    cut = mrc.config_for("flux1-40pct")
    assert (cut["num_layers"], cut["num_single_layers"]) == (8, 16)
    weight_bytes = sum(s.nbytes for s in mrc.layout(mrc.meta_model(cut)))
    assert weight_bytes == 10_096_488_576 and 0.35 < weight_bytes / (24 * 2**30) < 0.41  # ~40% of 24 GiB
    assert mrc.config_for("flux1-dev", double=2, single=3)["num_single_layers"] == 3


def test_refusals_are_one_line_and_write_nothing(tmp_path):
    script = str(ROOT / "scripts" / "make_random_checkpoint.py")
    for args, words in ((["--preset", "flux2"], "unknown preset"), (["--double", "-1"], "block counts"),
                        (["--preset", "tiny", "--device", "tpu"], "unknown device")):
        proc = subprocess.run([sys.executable, script, str(tmp_path / "x"), *args], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and words in proc.stderr, proc.stderr
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    proc = subprocess.run([sys.executable, script, str(tmp_path / "mine"), "--preset", "tiny"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "not an svdexport output" in proc.stderr
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no half-written folder left beside it
