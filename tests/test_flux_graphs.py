"""The two FLUX graphs against the unmodified diffusers transformer."""

import copy

import pytest
import torch
from torch import nn

from helpers import random_bases
from svdexport.models.flux import FLUX
from svdexport.builder.records import parameter_count


def call_args(graph, inputs, t, bases, coeffs=None, residuals=None):
    state = {**inputs, "timestep": t, "bases": bases, "coeffs": coeffs, "residuals": residuals}
    return tuple(state[n] for n in graph.input_names)


def reference(model, inputs, t):
    return model(hidden_states=inputs["hidden_states"], encoder_hidden_states=inputs["encoder_hidden_states"],
                 pooled_projections=inputs["pooled_projections"], timestep=t, img_ids=inputs["img_ids"],
                 txt_ids=inputs["txt_ids"], guidance=inputs.get("guidance"), return_dict=False)[0]


T = torch.tensor([0.6])


def full_step(model, shapes, granularity, seed):
    """Inputs, both graphs, random bases and the full graph's (output, C, R) for one step."""
    inputs = FLUX.example_inputs(dict(model.config), shapes, seed=seed)
    full, cached = FLUX.graphs(model, granularity)
    bases = random_bases(model, granularity, 8)
    return inputs, full, cached, bases, full(*call_args(full, inputs, T, bases))


@torch.no_grad()
@pytest.mark.parametrize("granularity", ["block", "final"])
def test_full_graph_output_is_the_unmodified_transformers(model, shapes, granularity):
    inputs, _, _, _, (out, coeffs, residuals) = full_step(model, shapes, granularity, seed=1)
    assert torch.equal(out, reference(model, inputs, T))
    n_sites = len(FLUX.sites(dict(model.config), granularity))
    assert coeffs.shape == (n_sites, 1, shapes.img_tokens, 8)
    assert residuals.shape == (n_sites, 1, shapes.img_tokens, FLUX.hidden_size(dict(model.config)))


@torch.no_grad()
def test_final_site_is_the_hidden_state_before_norm_out(model, shapes):
    inputs, _, _, bases, (_, coeffs, residuals) = full_step(model, shapes, "final", seed=2)
    # Independent extraction: the same transformer with its output head removed returns that state.
    headless = copy.deepcopy(model)
    headless.norm_out = type("Pass", (nn.Module,), {"forward": lambda self, x, temb: x})()
    headless.proj_out = nn.Identity()
    expected = reference(headless, inputs, T)
    assert torch.allclose(coeffs[0] @ bases[0].T + residuals[0], expected, atol=1e-5)


@torch.no_grad()
def test_block_sites_explain_each_blocks_image_update(model, shapes):
    """C V^T + R per site, times the block's gates, is exactly what each block adds to the image stream."""
    inputs, _, _, bases, (_, coeffs, residuals) = full_step(model, shapes, "block", seed=3)
    feats = coeffs @ bases.unsqueeze(1).transpose(-1, -2) + residuals
    # Image stream in/out of every block, taken with hooks on the blocks themselves (not the graph's sites).
    seen = []
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    handles = [b.register_forward_hook(lambda m, a, kw, out: seen.append((kw, out)), with_kwargs=True) for b in blocks]
    try:
        reference(model, inputs, T)
    finally:
        for h in handles:
            h.remove()
    txt = shapes.text_len
    site = 0
    for block, (kw, (enc_out, img_out)) in zip(blocks, seen):
        temb, img_in = kw["temb"], kw["hidden_states"]
        if hasattr(block, "norm1"):
            mod = block.norm1.linear(block.norm1.silu(temb)).chunk(6, dim=1)
            update = mod[2][:, None] * feats[site] + mod[5][:, None] * feats[site + 1]
            site += 2
        else:
            gate = block.norm.linear(block.norm.silu(temb)).chunk(3, dim=1)[2]
            update = gate[:, None] * feats[site]
            site += 1
        assert img_out.shape[1] == shapes.img_tokens and enc_out.shape[1] == txt
        assert torch.allclose(img_out - img_in, update, atol=1e-5)
    assert site == feats.shape[0]


@torch.no_grad()
@pytest.mark.parametrize("granularity", ["block", "final"])
def test_cached_graph_with_exact_features_equals_full_step(model, shapes, granularity):
    inputs, _, cached, bases, (out, coeffs, residuals) = full_step(model, shapes, granularity, seed=4)
    again = cached(*call_args(cached, inputs, T, bases, coeffs, residuals))
    assert torch.allclose(again, out, atol=1e-5 * out.abs().max())


def test_cached_graph_holds_no_attention_or_mlp_weights(model):
    for granularity in ("block", "final"):
        full, cached = FLUX.graphs(model, granularity)
        names = [n for n, _ in cached.named_parameters()]
        assert not any(".attn." in n or ".ff." in n or "proj_mlp" in n or "context_embedder" in n for n in names)
        assert parameter_count(cached) < parameter_count(full) / 2
        # Shared with the transformer, not copied.
        model_params = {id(p) for p in model.parameters()}
        assert all(id(p) in model_params for p in cached.parameters())


@torch.no_grad()
@pytest.mark.parametrize("granularity", ["block", "final"])
def test_both_graphs_export_with_torch_export(model, shapes, granularity):
    inputs = FLUX.example_inputs(dict(model.config), shapes, seed=5)
    full, cached = FLUX.graphs(model, granularity)
    bases = random_bases(model, granularity, 8)
    full_args = call_args(full, inputs, T, bases)
    out, coeffs, residuals = full(*full_args)
    exported = torch.export.export(full, full_args)
    for a, b in zip(exported.module()(*full_args), (out, coeffs, residuals)):
        assert torch.allclose(a, b, atol=1e-5)
    cached_args = call_args(cached, inputs, T, bases, coeffs, residuals)
    exported_cached = torch.export.export(cached, cached_args)
    assert torch.allclose(exported_cached.module()(*cached_args), cached(*cached_args), atol=1e-5)
    # Positional tensors only, one per declared input name.
    assert len(exported.graph_signature.user_inputs) == len(full.input_names)
    assert len(exported_cached.graph_signature.user_inputs) == len(cached.input_names)
