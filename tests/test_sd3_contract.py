"""The graph contract of models/family.py, held by all three families (FLUX, HunyuanVideo, SD3): the graphs take
and return what the contract declares, in its order; the families' inputs have the declared dtypes (in float32
and bfloat16 builds) and are contiguous; a graph or an input that breaks it is refused; the shared MMDiT code
names the sites from each family's block lists."""

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel, SD3Transformer2DModel
from torch import nn

from helpers import TINY_SHAPES, tiny_model
from svdexport.errors import SvdExportError
from svdexport.models import FAMILIES
from svdexport.models.family import (BASES, COEFFS, FULL_OUTPUTS, LATENTS, RESIDUALS, TIMESTEP, Conditioning,
                                     GraphContract, GraphInput)
from svdexport.models.flux import FLUX
from svdexport.models.hunyuanvideo import HUNYUANVIDEO as HV
from svdexport.models.hunyuanvideo import VideoShapes
from svdexport.models.sd3 import SD3, SD3Shapes


def cases():
    torch.manual_seed(0)
    hv = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                        num_layers=1, num_single_layers=1, num_refiner_layers=1, text_embed_dim=16,
                                        pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), guidance_embeds=True).eval()
    sd3 = SD3Transformer2DModel(sample_size=16, in_channels=16, num_layers=2, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                                pooled_projection_dim=16, out_channels=16, pos_embed_max_size=16,
                                dual_attention_layers=(0,), qk_norm="rms_norm").eval()
    return {"flux": (FLUX, tiny_model(guidance=True), TINY_SHAPES),
            "hunyuanvideo": (HV, hv, VideoShapes(frames=5, height=64, width=64, text_len=8)),
            "sd3": (SD3, sd3, SD3Shapes(height=64, width=64, text_len=8))}


CASES = cases()


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("granularity", ["block", "final"])
@pytest.mark.parametrize("name", list(CASES))
def test_graphs_keep_the_contract(name, granularity, dtype):
    fam, model, shapes = CASES[name]
    model = model.to(dtype)
    config = dict(model.config)
    contract = fam.contract(config, granularity)
    full, cached = fam.graphs(model, granularity)
    assert full.input_names == contract.names("full") and cached.input_names == contract.names("cached")
    assert tuple(full.output_names) == FULL_OUTPUTS and cached.output_names == ["noise_pred"]
    assert BASES.name in full.input_names and COEFFS.name not in full.input_names
    assert {TIMESTEP.name, BASES.name, COEFFS.name, RESIDUALS.name} <= set(cached.input_names)
    x = fam.example_inputs(config, shapes, seed=0, dtype=dtype)
    n, d = len(fam.sites(config, granularity)), fam.hidden_size(config)
    t = fam.sampling(fam.sampler_config(None, config)).model_timestep(torch.tensor(500.0), x[LATENTS.name])
    state = {**x, TIMESTEP.name: t, BASES.name: torch.linalg.qr(torch.randn(n, d, d))[0][..., :4].contiguous()}
    out, state[COEFFS.name], state[RESIDUALS.name] = full(*[state[k] for k in full.input_names])
    contract.check(state, dtype)  # every input of both graphs as declared: dtype and contiguity
    assert out.shape == x[LATENTS.name].shape and out.dtype == dtype
    assert cached(*[state[k] for k in cached.input_names]).shape == out.shape
    # The batched inputs are the ones whose rows are samples (joined in calibration, padded in pipelines).
    assert LATENTS.name in fam.batched and BASES.name not in fam.batched
    assert all(state[k].shape[0] == shapes.batch for k in fam.batched if k in state)
    assert state[fam.text_input].shape[1] == shapes.text_len


def test_a_broken_graph_or_input_is_refused():
    contract = FLUX.contract(dict(tiny_model().config), "block")

    class Swapped(nn.Module):
        def forward(self, timestep, hidden_states, pooled_projections, bases, coeffs, residuals):
            return hidden_states

    with pytest.raises(TypeError, match="contract is"):
        contract.bind(Swapped(), "cached")
    good = {i.name: torch.zeros(2, 3, dtype=i.torch_dtype(torch.bfloat16)) for i in (*contract.full, *contract.cached)}
    contract.check(good, torch.bfloat16)
    for name, bad in ((TIMESTEP.name, torch.zeros(1, dtype=torch.bfloat16).expand(2)),  # stride 0
                      ("rotary_cos", torch.zeros(2, 3, dtype=torch.bfloat16)),  # float32 by the contract
                      (COEFFS.name, torch.zeros(2, 3, dtype=torch.bfloat16))):
        with pytest.raises(TypeError, match=name):
            contract.check({**good, name: bad}, torch.bfloat16)
    with pytest.raises(TypeError, match="declares no graph input 'prompt'"):
        FLUX.declare(["hidden_states", "prompt"], [])
    assert GraphContract((LATENTS, GraphInput("mask", "int64")), ()).names("full") == ["hidden_states", "mask"]


def test_the_shared_mmdit_code_names_sites_from_the_family_block_lists():
    """FLUX's and HunyuanVideo's site names (double then single blocks) as before the block lists; SD3's from
    its joint blocks, attn2 only where the config has dual attention."""
    flux = dict(num_layers=2, num_single_layers=3)
    assert FLUX.sites(flux, "block") == ["double.0.attn", "double.0.ff", "double.1.attn", "double.1.ff", "single.0",
                                         "single.1", "single.2"]
    assert HV.sites(flux, "final") == ["final"]
    assert SD3.sites(dict(num_layers=2, dual_attention_layers=[1]), "block") == [
        "joint.0.attn", "joint.0.ff", "joint.1.attn", "joint.1.attn2", "joint.1.ff"]


def test_conditioning_rows_and_shape_axes():
    rows = Conditioning({"a": torch.arange(3.0)[:, None], "b": torch.arange(3)[:, None]})
    assert rows.pick(seed=2, batch=2)["a"].flatten().tolist() == [2.0, 0.0]  # rows seed, seed + 1, ... modulo 3
    assert Conditioning(rows.rows, [1, 1]).pick(0, 2)["b"].flatten().tolist() == [1, 1]
    with pytest.raises(SvdExportError, match=r"labels must be 2 class indices in \[0, 3\)"):
        Conditioning(rows.rows, [3, 0]).pick(0, 2)
    for fam in FAMILIES.values():  # what the CLI offers: every axis with its help text
        axes = fam.shapes_type.axes()
        assert list(axes) == fam.shapes_type.names() and all(axes.values())
        assert ("frames" in axes) == fam.is_video
