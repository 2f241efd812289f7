"""SD3 (diffusers' SD3Transformer2DModel) as a family: the graphs against the unmodified transformer, for SD3
Medium's joint blocks and SD3.5 Medium's MMDiT-X blocks (dual attention); the released configs' sites and sizes;
the sampler against StableDiffusion3Pipeline's; bundled random weights; single files of both layouts; the peers;
and engines against diffusers' own denoising loop at interval 1 (eager and aoti)."""

import copy

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from safetensors.torch import save_file

import svdexport
from helpers import random_bases, run_cli
from svdexport.bench import peers
from svdexport.bench.metrics import rel_l2
from svdexport.cache.plan import StepPlan
from svdexport.cli import main
from svdexport.errors import SvdExportError
from svdexport.models import sd3
from svdexport.models.sd3 import SD3, SD3Shapes
from svdexport.models.weights import WeightsInfo

TINY = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=16,
            pos_embed_max_size=16)
VARIANTS = {"sd3": {}, "sd3.5-mmdit-x": dict(dual_attention_layers=(0, 1), qk_norm="rms_norm")}
SHAPES = SD3Shapes(height=128, width=128, text_len=16)
T = torch.tensor([600.0])  # SD3 takes the raw timestep
FAST = ["--model", "sd3", "--calib-samples", "1", "--calib-steps", "4", "--height", "128", "--width", "128",
        "--text-len", "8", "--dtype", "fp32"]


def tiny(variant: str, seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**TINY, **VARIANTS[variant]).eval().requires_grad_(False)


@pytest.fixture(params=list(VARIANTS))
def model(request):
    return tiny(request.param)


def call_args(graph, inputs, t, bases, coeffs=None, residuals=None):
    state = {**inputs, "timestep": t, "bases": bases, "coeffs": coeffs, "residuals": residuals}
    return tuple(state[n] for n in graph.input_names)


def full_step(model, granularity, seed):
    inputs = SD3.example_inputs(dict(model.config), SHAPES, seed=seed)
    full, cached = SD3.graphs(model, granularity)
    bases = random_bases(model, granularity, 8, family=SD3)
    with torch.no_grad():
        return inputs, full, cached, bases, full(*call_args(full, inputs, T, bases))


@torch.no_grad()
def pipeline_loop(model, inputs, steps):
    """StableDiffusion3Pipeline's denoising loop (without CFG), restated with the unmodified transformer."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    latents = inputs["hidden_states"]
    for t in scheduler.timesteps:
        noise = model(hidden_states=latents, timestep=t.expand(latents.shape[0]),
                      encoder_hidden_states=inputs["encoder_hidden_states"],
                      pooled_projections=inputs["pooled_projections"], return_dict=False)[0]
        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
    return latents


# ----------------------------------------------------------------------------------------------- graphs


@torch.no_grad()
@pytest.mark.parametrize("granularity", ["block", "final"])
def test_full_graph_is_the_transformer_and_cached_step_with_exact_features_equals_it(model, granularity):
    inputs, _, cached, bases, (out, coeffs, residuals) = full_step(model, granularity, seed=1)
    assert torch.equal(out, model(**SD3.forward_kwargs(inputs, T))[0])
    sites = SD3.sites(dict(model.config), granularity)
    assert coeffs.shape == (len(sites), 1, SHAPES.img_tokens, 8)
    again = cached(*call_args(cached, inputs, T, bases, coeffs, residuals))
    assert (again - out).abs().max() <= 1e-5 * out.abs().max()


@torch.no_grad()
def test_block_sites_explain_each_blocks_image_update(model):
    """Per joint block, gate x feature summed over its sites (attention, dual attention where the block has it,
    MLP) is exactly what the block adds to the image stream; the last block is context_pre_only."""
    inputs, _, _, bases, (_, coeffs, residuals) = full_step(model, "block", seed=3)
    feats = coeffs @ bases.unsqueeze(1).transpose(-1, -2) + residuals
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, kw, out: seen.append((kw, out)), with_kwargs=True)
             for b in model.transformer_blocks]
    try:
        model(**SD3.forward_kwargs(inputs, T))
    finally:
        for h in hooks:
            h.remove()
    site = 0
    for block, (kw, (context, image)) in zip(model.transformer_blocks, seen):
        mod = block.norm1.linear(block.norm1.silu(kw["temb"]))
        # AdaLayerNormZero: shift, scale, gate of the attention, then of the MLP; SD35AdaLayerNormZeroX adds
        # shift, scale, gate of attn2. The sites run attention, attn2, MLP.
        gates = [2, 8, 5] if block.attn2 is not None else [2, 5]
        chunks = mod.chunk(9 if block.attn2 is not None else 6, dim=1)
        update = sum(chunks[g][:, None] * feats[site + k] for k, g in enumerate(gates))
        site += len(gates)
        assert torch.allclose(image - kw["hidden_states"], update, atol=1e-5)
    assert site == feats.shape[0] and seen[-1][1][0] is None  # the last block leaves no context stream


def test_cached_graph_holds_no_attention_or_mlp_weights(model):
    for granularity in ("block", "final"):
        full, cached = SD3.graphs(model, granularity)
        names = [n for n, _ in cached.named_parameters()]
        assert not any(".attn" in n or ".ff" in n or "context_embedder" in n for n in names)
        own = {id(p) for p in model.parameters()}
        assert all(id(p) in own for p in cached.parameters())
        assert len(cached.input_names) == len(full.input_names) + 1  # coeffs and residuals; no text


@torch.no_grad()
def test_both_graphs_export(model):
    inputs, full, cached, bases, (out, coeffs, residuals) = full_step(model, "block", seed=5)
    cached_args = call_args(cached, inputs, T, bases, coeffs, residuals)
    exported = torch.export.export(cached, cached_args)
    assert torch.allclose(exported.module()(*cached_args), cached(*cached_args), atol=1e-5)
    full_args = call_args(full, inputs, T, bases)
    assert torch.allclose(torch.export.export(full, full_args).module()(*full_args)[0], out, atol=1e-5)


BASE = dict(sample_size=128, patch_size=2, in_channels=16, attention_head_dim=64, joint_attention_dim=4096,
            pooled_projection_dim=2048, out_channels=16)
RELEASED = {  # the transformer/config.json of each release (stabilityai/...-diffusers)
    "stable-diffusion-3-medium": dict(BASE, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                                      pos_embed_max_size=192),
    "stable-diffusion-3.5-medium": dict(BASE, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                                        pos_embed_max_size=384, qk_norm="rms_norm",
                                        dual_attention_layers=list(range(13))),
    "stable-diffusion-3.5-large": dict(BASE, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                                       pos_embed_max_size=192, qk_norm="rms_norm"),
}


@pytest.mark.parametrize("release", RELEASED)
def test_released_configs_sites_and_sizes(release):
    """Sites of the three releases (attn2 only in SD3.5 Medium's first 13 blocks) and their published sizes:
    2B, 2.5B with its position table of 384x384 patches, 8.1B."""
    config = RELEASED[release]
    sites = SD3.sites(config, "block")
    dual = len(config.get("dual_attention_layers", ()))
    assert len(sites) == 2 * config["num_layers"] + dual and len(set(sites)) == len(sites)
    assert [s for s in sites if s.endswith("attn2")] == [f"joint.{i}.attn2" for i in range(dual)]
    table = config["pos_embed_max_size"] ** 2 * config["caption_projection_dim"]
    billions = SD3.parameters(config) / 1e9, (SD3.parameters(config) + table) / 1e9
    published = {"stable-diffusion-3-medium": 2.0, "stable-diffusion-3.5-medium": 2.5,
                 "stable-diffusion-3.5-large": 8.1}[release]
    assert any(abs(b - published) < 0.05 for b in billions), billions
    assert SD3.default_shapes(WeightsInfo("x", config)) == SD3Shapes(height=1024, width=1024, text_len=333)


def test_sampler_is_the_pipelines():
    """Timesteps of StableDiffusion3Pipeline (retrieve_timesteps, and its calculate_shift for a config with a
    resolution-dependent shift), and the raw timestep per row, contiguous."""
    from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3 as p

    for config in (sd3.SAMPLER_CONFIG, {**sd3.SAMPLER_CONFIG, "use_dynamic_shifting": True}):
        ours = SD3.sampling(config)
        theirs = FlowMatchEulerDiscreteScheduler.from_config(config)
        mu = p.calculate_shift(SHAPES.img_tokens, 256, 4096, 0.5, 1.15) if config.get("use_dynamic_shifting") else None
        want, _ = p.retrieve_timesteps(theirs, 28, "cpu", **({"mu": mu} if mu is not None else {}))
        assert torch.equal(ours.set_timesteps(ours.scheduler(), 28, SHAPES), want)
    t = SD3.sampling(sd3.SAMPLER_CONFIG).model_timestep(torch.tensor(900.0), torch.zeros(3, 16, 8, 8))
    assert t.tolist() == [900.0] * 3 and t.is_contiguous()


def test_shapes_beyond_the_position_table_are_refused():
    with pytest.raises(SvdExportError, match="at most 256 pixels"):
        SD3.example_inputs(TINY, SD3Shapes(height=272, width=128, text_len=8), seed=0)


# ---------------------------------------------------------------------------------------------- weights


def test_bundled_random_weights_hold_the_models_own_position_table():
    """bundled:random (SD3.5 Medium's layout at hidden 128): made per tensor, its persistent position table the
    one the model's own init computes; loaded on the meta device without a tensor left behind."""
    info = SD3.inspect(None)
    assert info.source == "bundled:random" and info.config["dual_attention_layers"] == [0, 1]
    loaded = SD3.load(info, torch.float32)
    torch.manual_seed(0)
    own = SD3Transformer2DModel(**info.config)
    assert torch.equal(loaded.pos_embed.pos_embed, own.pos_embed.pos_embed)
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    assert SD3.sites(info.config, "block")[:3] == ["joint.0.attn", "joint.0.attn2", "joint.0.ff"]


def to_original(state: dict, layers: int, dual: tuple) -> dict:
    """diffusers' names back to Stability AI's original layout (the inverse of diffusers' converter): fused qkv,
    and the scale/shift halves of the final and last-context modulations swapped back."""
    swap = lambda w: torch.cat(w.chunk(2)[::-1])  # noqa: E731  (involution)
    out = {"pos_embed": state["pos_embed.pos_embed"], "context_embedder.weight": state["context_embedder.weight"],
           "context_embedder.bias": state["context_embedder.bias"]}
    names = {"pos_embed.proj": "x_embedder.proj", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
             "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
             "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear"}
    for i in range(layers):
        b, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{o}x_block.attn.qkv.{p}"] = torch.cat([state[f"{b}attn.to_{x}.{p}"] for x in "qkv"])
            out[f"{o}context_block.attn.qkv.{p}"] = torch.cat([state[f"{b}attn.add_{x}_proj.{p}"] for x in "qkv"])
            if i in dual:
                out[f"{o}x_block.attn2.qkv.{p}"] = torch.cat([state[f"{b}attn2.to_{x}.{p}"] for x in "qkv"])
            ctx = state[f"{b}norm1_context.linear.{p}"]
            out[f"{o}context_block.adaLN_modulation.1.{p}"] = swap(ctx) if i == layers - 1 else ctx
            out[f"{o}x_block.adaLN_modulation.1.{p}"] = state[f"{b}norm1.linear.{p}"]
        names.update({f"{b}attn.to_out.0": f"{o}x_block.attn.proj", f"{b}ff.net.0.proj": f"{o}x_block.mlp.fc1",
                      f"{b}ff.net.2": f"{o}x_block.mlp.fc2", f"{b}attn2.to_out.0": f"{o}x_block.attn2.proj",
                      f"{b}attn.to_add_out": f"{o}context_block.attn.proj",
                      f"{b}ff_context.net.0.proj": f"{o}context_block.mlp.fc1",
                      f"{b}ff_context.net.2": f"{o}context_block.mlp.fc2"})
        for ours, theirs in (("norm_q", "x_block.attn.ln_q"), ("norm_k", "x_block.attn.ln_k"),
                             ("norm_added_q", "context_block.attn.ln_q"), ("norm_added_k", "context_block.attn.ln_k")):
            if f"{b}attn.{ours}.weight" in state:
                out[f"{o}{theirs}.weight"] = state[f"{b}attn.{ours}.weight"]
        for ours in ("norm_q", "norm_k"):
            if f"{b}attn2.{ours}.weight" in state:
                out[f"{o}x_block.attn2.ln_{ours[-1]}.weight"] = state[f"{b}attn2.{ours}.weight"]
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = swap(state[f"norm_out.linear.{p}"])
    for k, v in state.items():
        for ours, theirs in names.items():
            if k.startswith(ours + "."):
                out[theirs + k[len(ours):]] = v
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_single_files_of_both_layouts_load_the_same_transformer(tmp_path, variant):
    """A diffusers-layout file and Stability's original all-in-one layout (under model.diffusion_model., beside
    a VAE tensor that is skipped): the config inferred from the shapes (the head width from the qk-norm weights;
    without them SD3's 64, which the tiny model's 16 is not: its config.json beside the file), the weights equal."""
    model = tiny(variant)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    dual = tuple(VARIANTS[variant].get("dual_attention_layers", ()))
    original = {f"model.diffusion_model.{k}": v for k, v in to_original(state, TINY["num_layers"], dual).items()}
    original["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4)
    for name, tensors in (("diffusers", state), ("original", original)):
        path = tmp_path / name / "model.safetensors"
        path.parent.mkdir()
        save_file(tensors, str(path))
        if model.config.qk_norm is None:
            with pytest.raises(SvdExportError, match="put the transformer's config.json beside the file"):
                SD3.inspect(str(path))
            model.save_config(path.parent)
        info = SD3.inspect(str(path))
        assert {k: info.config[k] for k in TINY if k != "sample_size"} == {
            k: v for k, v in dict(model.config).items() if k in TINY and k != "sample_size"}
        assert list(info.config["dual_attention_layers"]) == list(dual)
        assert info.config["qk_norm"] == model.config.qk_norm
        loaded = SD3.load(info, torch.float32).state_dict()
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    bad = tmp_path / "bad.safetensors"
    save_file({"something.weight": torch.zeros(2)}, str(bad))
    with pytest.raises(SvdExportError, match="not an SD3 transformer"):
        SD3.inspect(str(bad))


# ------------------------------------------------------------------------------------------------ peers


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()  # the tiny model gains nothing from threads on a busy 2-core machine
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", [p for p in peers.PEERS if p in SD3.peer_libraries])
def test_peer_on_sd3(name, one_thread):
    """Every peer wired for SD3 on the tiny SD3.5 transformer: it skips steps, stays near the plain loop (itself
    StableDiffusion3Pipeline's), and leaves the model as it was (its class too: diffusers' cache mixin is lent)."""
    reason = peers.available(name, SD3)
    if reason is not None:
        pytest.skip(reason)
    model, steps = tiny("sd3.5-mmdit-x"), 20
    inputs = SD3.example_inputs(dict(model.config), SHAPES, seed=0)
    loop = peers.PeerLoop(SD3, SD3.sampling(sd3.SAMPLER_CONFIG), SHAPES, steps)
    plain, _ = peers._sample(model, loop, inputs)
    assert torch.allclose(plain, pipeline_loop(model, inputs, steps), atol=1e-5)
    weights = copy.deepcopy(model.state_dict())
    r = peers.run_peer(name, model, loop, inputs, 3, 4)
    assert torch.isfinite(r.latents).all() and 0 < r.full_steps < steps
    if name.startswith("cachedit"):
        assert r.full_steps == len(StepPlan.uniform(steps, 3, 4).full_steps)
    assert rel_l2(r.latents, plain) < 0.5
    assert torch.equal(peers._sample(model, loop, inputs)[0], plain)  # no cache left behind
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert type(model) is SD3Transformer2DModel


# ---------------------------------------------------------------------------------------------- engines


@pytest.fixture(scope="module")
def eager_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd3-eager") / "engine"
    assert main(["build", *FAST, "--granularity", "block", "--out", str(out)]) == 0
    return out


def test_cli_builds_and_runs_the_bundled_model(eager_dir, tmp_path, capsys):
    code, stdout, err = run_cli(capsys, "run", eager_dir, "--steps", "8", "--out", tmp_path / "x.png")
    assert code == 0, err
    assert "8 steps:" in stdout and (tmp_path / "x.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "aoti"])
def test_engine_at_interval_1_matches_diffusers_loop(eager_dir, tmp_path, backend):
    """The engine every step in full against StableDiffusion3Pipeline's loop on the unmodified transformer:
    relative L2 under 1e-3 in fp32 (the issue's bar); and cached, the compiled engine equals its eager twin."""
    out = eager_dir
    if backend != "eager":
        out = tmp_path / "engine"
        assert main(["build", *FAST, "--granularity", "block", "--backend", backend, "--out", str(out),
                     "--graphs", str(tmp_path / "graphs")]) == 0
    engine = svdexport.load(out)
    model = SD3.load(SD3.inspect(None), torch.float32)
    inputs = engine.example_inputs(3)
    got = engine.generate(inputs, steps=12, interval=1)
    assert got.full_steps == 12
    assert rel_l2(got.latents, pipeline_loop(model, inputs, 12)) < 1e-3
    cached, twin = engine.generate(inputs, steps=12), engine.eager_reference().generate(inputs, steps=12)
    assert cached.cached_steps > 0 and rel_l2(cached.latents, twin.latents) < 1e-3
    engine.close()


@pytest.mark.slow
@pytest.mark.extended
def test_compare_runs_every_method_and_the_peers_wired_for_sd3(eager_dir):
    """`compare` on an SD3 engine: the project's methods and the three peers that run on SD3, not TaylorSeer's
    lite mode (refused with its reason), every row at the budget asked for."""
    from svdexport.bench.compare import compare

    assert "no context" in peers.available("diffusers-taylorseer", SD3, lite=True)
    rows = compare(str(eager_dir), samples=1, steps=8, budgets=(4,), progress=False)["rows"]
    ran = {r["peer"] for r in rows if r["peer"]}
    assert ran == {p for p in SD3.peer_libraries if peers.available(p, SD3) is None}
    assert not any("lite" in r["method"] for r in rows)
    assert all(r["full_steps"] == (8 if r["reference"] else 4) for r in rows)
