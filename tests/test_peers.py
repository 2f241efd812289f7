"""Peer caching libraries on the tiny FLUX model: they skip work, stay close to the plain loop, and leave
the model exactly as it was."""

import dataclasses
import sys

import pytest
import torch

from helpers import TINY_SHAPES, tiny_model
from helpers import plain_diffusers_loop
from svdexport.bench import peers
from svdexport.bench.metrics import rel_l2
from svdexport.cache.plan import StepPlan
from svdexport.errors import SvdExportError
from svdexport.models import flux
from svdexport.models.flux import FLUX

LOOP = peers.PeerLoop(FLUX, FLUX.sampling(flux.SAMPLER_CONFIG), TINY_SHAPES, 0)

STEPS, WARMUP, INTERVAL = 20, 3, 4
# diffusers' TaylorSeer hook computes when i < warmup or (i - warmup - 1) % interval == 0
# (taylorseer_cache.py, _measure_should_compute): steps 0, 1, 2, 4, 8, 12, 16.
TAYLORSEER_FULL = 7
# (peer, options): every peer with its defaults, plus the variants whose code paths differ.
CASES = [(name, {}) for name in peers.PEERS] + [
    ("diffusers-taylorseer", {"order": 2}),
    ("diffusers-taylorseer", {"lite": True}),
    ("cachedit-dbcache", {"schedule": "dynamic", "threshold": 0.5}),
    ("cachedit-dbcache-taylorseer", {"schedule": "dynamic", "threshold": 0.5}),
    ("cachedit-dbcache", {"plan": [i in (0, 2, 5, 11, 17) for i in range(STEPS)]}),  # a given (calibrated) plan
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny model gains nothing from threads, and on a busy 2-core machine oversubscribed OpenMP
    # threads make every step ~100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model(guidance=True)  # guidance embeds: the FLUX.1-dev layout
    inputs = FLUX.example_inputs(dict(model.config), TINY_SHAPES, seed=0)
    return model, inputs, plain_diffusers_loop(model, inputs, STEPS, TINY_SHAPES)


def _state(model, inputs):
    """Everything a later user of the model sees: one forward, module order, attributes, hooks, weights."""
    with torch.no_grad():
        out = model(hidden_states=inputs["hidden_states"], timestep=torch.full((1,), 0.5),
                    guidance=inputs["guidance"], pooled_projections=inputs["pooled_projections"],
                    encoder_hidden_states=inputs["encoder_hidden_states"], txt_ids=inputs["txt_ids"],
                    img_ids=inputs["img_ids"], return_dict=False)[0]
    modules = [(n, sorted(m.__dict__), len(m._forward_hooks), len(m._forward_pre_hooks))
               for n, m in model.named_modules()]
    return out, modules, [(k, v.clone()) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}{''.join(f'-{k}={v}' for k, v in o.items())}"
                                                     for n, o in CASES])
def test_peer(setup, name, options):
    reason = peers.available(name)
    if reason is not None:
        pytest.skip(reason)
    model, inputs, plain = setup
    before = _state(model, inputs)
    r = peers.run_peer(name, model, dataclasses.replace(LOOP, steps=STEPS), inputs, WARMUP, INTERVAL, **options)

    assert r.latents.shape == inputs["hidden_states"].shape and torch.isfinite(r.latents).all()
    assert 0 < r.full_steps < STEPS
    if name == "diffusers-taylorseer":
        assert r.full_steps == TAYLORSEER_FULL
    if name.startswith("cachedit") and options.get("schedule", "plan") == "plan":
        mask = options.get("plan") or StepPlan.uniform(STEPS, WARMUP, INTERVAL).mask
        assert r.full_steps == sum(mask)  # exactly that plan
    assert rel_l2(r.latents, plain) < 0.5

    after = _state(model, inputs)
    assert torch.equal(after[0], before[0])
    assert after[1] == before[1]
    assert all(ka == kb and torch.equal(a, b) for (ka, a), (kb, b) in zip(after[2], before[2]))
    assert len(after[2]) == len(before[2])


def test_taylorseer_schedule_reaches_a_budget():
    assert len(peers.taylorseer_plan(STEPS, WARMUP, INTERVAL)) == TAYLORSEER_FULL  # what the hook ran above
    assert peers.taylorseer_plan(50, 3, 8) == [0, 1, 2, 4, 12, 20, 28, 36, 44]
    for budget in range(2, 30):
        w, iv = peers.taylorseer_schedule(50, budget, 3)
        assert len(peers.taylorseer_plan(50, w, iv)) == budget and w >= 1
    assert peers.taylorseer_schedule(50, 9, 3) == (3, 8) and peers.taylorseer_schedule(50, 12, 3) == (4, 6)


def test_model_restored_when_the_loop_fails(setup):
    model, inputs, _ = setup
    before = _state(model, inputs)
    bad = {**inputs, "img_ids": inputs["img_ids"][:3]}  # wrong token count: the forward raises
    with pytest.raises(RuntimeError, match="must match the size"):  # the rotary table against the tokens
        peers.run_peer("diffusers-fbcache", model, dataclasses.replace(LOOP, steps=STEPS), bad, WARMUP, INTERVAL)
    after = _state(model, inputs)
    assert torch.equal(after[0], before[0]) and after[1] == before[1]


def test_unknown_peer_and_option():
    model = tiny_model()
    with pytest.raises(SvdExportError, match="unknown peer 'nope'") as e:
        peers.run_peer("nope", model, dataclasses.replace(LOOP, steps=STEPS), {}, WARMUP, INTERVAL)
    assert "\n" not in str(e.value)
    with pytest.raises(SvdExportError, match="unknown peer"):
        peers.available("nope")
    with pytest.raises(SvdExportError, match="no option bogus"):
        peers.run_peer("diffusers-fbcache", model, dataclasses.replace(LOOP, steps=STEPS), {}, WARMUP, INTERVAL,
                       bogus=1)


def test_missing_library_raises_the_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "cache_dit", None)  # as if not installed: find_spec and import fail
    reason = peers.available("cachedit-dbcache")
    assert reason == "cache-dit is not installed (pip install cache-dit)"
    with pytest.raises(SvdExportError, match="cache-dit is not installed"):
        peers.run_peer("cachedit-dbcache", tiny_model(), dataclasses.replace(LOOP, steps=STEPS), {}, WARMUP,
                       INTERVAL)


VIDEO = dict(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=1,
             num_single_layers=2, num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8,
             rope_axes_dim=(4, 6, 6), guidance_embeds=True)


@pytest.mark.parametrize("name", peers.PEERS)
def test_peer_on_hunyuanvideo(name):
    """Every peer on the tiny HunyuanVideo transformer: it skips steps, stays near the plain loop (the same
    loop with no cache), and leaves the model as it was."""
    from diffusers import HunyuanVideoTransformer3DModel

    from svdexport.models import hunyuanvideo as hv

    reason = peers.available(name, hv.HUNYUANVIDEO)
    if reason is not None:
        pytest.skip(reason)
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(**VIDEO).eval().requires_grad_(False)
    shapes = hv.VideoShapes(batch=1, frames=9, height=64, width=64, text_len=8)
    inputs = hv.HUNYUANVIDEO.example_inputs(dict(model.config), shapes, seed=0)
    loop = peers.PeerLoop(hv.HUNYUANVIDEO, hv.HUNYUANVIDEO.sampling(hv.SAMPLER_CONFIG), shapes, STEPS)
    plain, _ = peers._sample(model, loop, inputs)
    weights = [v.clone() for v in model.state_dict().values()]

    r = peers.run_peer(name, model, loop, inputs, WARMUP, INTERVAL)
    assert torch.isfinite(r.latents).all() and 0 < r.full_steps < STEPS
    if name.startswith("cachedit"):
        assert r.full_steps == len(StepPlan.uniform(STEPS, WARMUP, INTERVAL).full_steps)
    assert rel_l2(r.latents, plain) < 0.5
    assert torch.equal(peers._sample(model, loop, inputs)[0], plain)  # no cache left behind
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), weights))
