"""Precision: which dtype `--dtype auto` picks and why, what stays float32 in a bf16 engine, the FLOP count
bench uses, bf16 engines against eager bf16, and compare's float32 reference for a bf16 engine."""

import json

import pytest
import torch

from helpers import FAST, TINY, TINY_SHAPES, random_bases, run_cli, tiny_model
from svdexport import hardware
from svdexport.bench.roofline import count_flops
from svdexport.builder import precision
from svdexport.builder.build import BuildOptions, prepare
from svdexport.errors import SvdExportError
from svdexport.models.flux import FLUX


# ---------------------------------------------------------------------------------------------- detection


def test_cpuinfo_flags_are_read_from_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n\nprocessor\t: 1\n")
    assert hardware.cpu_flags(info) == {"fpu", "sse", "avx512f", "amx_bf16", "amx_tile"}
    assert hardware.cpu_flags(tmp_path / "missing") is None


@pytest.mark.parametrize("flags, capability, native, words", [
    ({"avx512f", "amx_bf16", "amx_tile", "avx512_bf16"}, "AVX512", True, "AMX-BF16"),  # Sapphire Rapids
    ({"avx512f", "avx512_bf16"}, "AVX512", True, "AVX512-BF16"),  # Zen 4, Cooper Lake
    ({"avx512f", "avx512_vnni"}, "AVX512", False, "no native bf16"),  # Skylake, Ice Lake
    ({"avx2", "fma"}, "AVX2", False, "no native bf16"),
    ({"avx512_bf16"}, "AVX2", False, "capability AVX2"),  # ATEN_CPU_CAPABILITY lowered by the user
])
def test_mocked_cpu_flags_give_bf16_or_fp32(flags, capability, native, words, monkeypatch):
    got, why = hardware.cpu_bf16(flags, capability)
    assert got is native and words in why
    monkeypatch.delenv(hardware.OVERRIDE, raising=False)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    monkeypatch.setattr(hardware, "cpu_capability", lambda: capability)
    dtype, reason = precision.auto_dtype("cpu", "aoti")
    assert dtype == ("bf16" if native else "fp32") and words in reason


def test_override_turns_detection_off_and_on(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"amx_bf16"})
    monkeypatch.setattr(hardware, "cpu_capability", lambda: "AVX512")
    monkeypatch.setenv(hardware.OVERRIDE, "0")
    assert precision.auto_dtype("cpu", "eager")[0] == "fp32"
    monkeypatch.setenv(hardware.OVERRIDE, "1")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: set())
    assert precision.auto_dtype("cpu", "eager")[0] == "bf16"


def test_auto_rule_order():
    bf16_cpu = lambda: (True, "this CPU has AMX-BF16")  # noqa: E731
    assert precision.auto_dtype("cuda", "aoti", cpu_bf16=lambda: (False, "")) == \
        ("bf16", "bf16 on CUDA, FLUX.1's released precision")
    dtype, why = precision.auto_dtype("cpu", "onnx", cpu_bf16=bf16_cpu)
    assert dtype == "fp32" and "ONNX Runtime's CPU provider has no bf16 kernels" in why
    assert precision.auto_dtype("cpu", "inductor", cpu_bf16=bf16_cpu)[0] == "bf16"
    declared = {"dtype": "fp32", "why": "bf16 costs 3 dB on it"}
    assert precision.auto_dtype("cuda", "aoti", declared) == ("fp32", "the model declares fp32: bf16 costs 3 dB on it")
    with pytest.raises(SvdExportError, match="declares precision 'int4'"):
        precision.auto_dtype("cpu", "aoti", {"dtype": "int4"})
    assert precision.resolve("fp32", "cpu", "aoti") == ("fp32", "--dtype fp32")


def test_onnx_with_auto_dtype_on_a_bf16_cpu_builds_fp32(monkeypatch):
    monkeypatch.setenv(hardware.OVERRIDE, "1")
    # bundled:random declares no precision, so the machine's rule decides; bundled:digits declares fp32.
    small = {"height": 128, "width": 128, "text_len": 8}
    p = BuildOptions(weights="bundled:random", backend="onnx", shapes=small)
    prepare(p)
    assert (p.dtype, p.dtype_reason) == ("fp32", "auto: ONNX Runtime's CPU provider has no bf16 kernels; --dtype bf16 "
                                             "keeps bf16 weights and computes in float32")
    d = BuildOptions(backend="aoti")
    prepare(d)
    assert d.dtype == "fp32" and d.dtype_reason.startswith("auto: the model declares fp32")
    q = BuildOptions(weights="bundled:random", backend="aoti", shapes=small)
    prepared = prepare(q)
    assert q.dtype == "bf16" and q.dtype_reason.startswith("auto: SVDEXPORT_CPU_BF16=1")
    assert next(prepared.model.parameters()).dtype == torch.bfloat16


def test_a_model_declaring_its_precision_keeps_it(tmp_path, monkeypatch):
    spec = json.loads((FLUX.bundled["random"]).read_text())
    spec["precision"] = {"dtype": "fp32", "why": "measured: bf16 loses 2 dB here"}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    monkeypatch.setitem(FLUX.bundled, "declared", path)
    monkeypatch.setenv(hardware.OVERRIDE, "1")
    opts = BuildOptions(weights="bundled:declared", shapes={"height": 128, "width": 128, "text_len": 8})
    prepare(opts)
    assert (opts.dtype, opts.dtype_reason) == ("fp32", "auto: the model declares fp32: measured: bf16 loses 2 dB here")


@pytest.mark.parametrize("model", ["flux", "hunyuanvideo"])
def test_both_digits_models_declare_fp32_on_a_bf16_cpu(model):
    """Measured (docs/precision.md): bf16 costs either trained digits model's SVD-Cache more than 1 dB against
    fp32 and runs its small steps slower, so `--dtype auto` keeps fp32 even on AMX-BF16 and AVX512-BF16 CPUs."""
    from svdexport.models import family

    info = family(model).inspect("bundled:digits")
    dtype, why = precision.auto_dtype("cpu", "aoti", info.precision, cpu_bf16=lambda: (True, "AMX-BF16"))
    assert dtype == "fp32" and why.startswith("the model declares fp32: measured:") and "dB" in why


# ------------------------------------------------------------------------------------- what stays float32


def test_bf16_graphs_keep_the_cache_math_in_float32():
    """C, its forecast and the reconstruction in float32; R stored in the model's dtype (mmdit.CACHE_DTYPE)."""
    model = tiny_model(guidance=True).to(torch.bfloat16)
    full, cached = FLUX.graphs(model, "block")
    bases = random_bases(model, "block", 8)
    x = FLUX.example_inputs(dict(model.config), TINY_SHAPES, seed=0, dtype=torch.bfloat16)
    state = {**x, "timestep": torch.tensor([0.4], dtype=torch.bfloat16), "bases": bases}
    assert x["rotary_cos"].dtype == torch.float32  # the rotary table stays float32, as diffusers keeps it
    with torch.no_grad():
        out, coeffs, residuals = full(*[state[n] for n in full.input_names])
        _, _, features = full(*[{**state, "bases": torch.zeros_like(bases)}[n] for n in full.input_names])
    assert out.dtype == residuals.dtype == features.dtype == torch.bfloat16 and coeffs.dtype == torch.float32
    # F = C V^T + R up to R's own bf16 rounding (zero bases make R the bf16 features themselves).
    rebuilt = coeffs @ bases.unsqueeze(1).transpose(-1, -2) + residuals.float()
    assert (rebuilt - features.float()).abs().max() <= 2**-8 * residuals.float().abs().max()
    # C is not rounded to bf16: the split ran in float32.
    assert (coeffs.to(torch.bfloat16).float() != coeffs).any()
    state["coeffs"], state["residuals"] = coeffs, residuals
    with torch.no_grad():
        step = cached(*[state[n] for n in cached.input_names])
        exact = cached(*[{**state, "residuals": residuals.float()}[n] for n in cached.input_names])
    assert step.dtype == torch.bfloat16 and torch.equal(step, exact)  # R is upcast before the reconstruction


# -------------------------------------------------------------------------------------------- FLOP count


def _linear(rows, n_in, n_out):
    return 2 * rows * n_in * n_out


def hand_count_full(cfg: dict, img: int, txt: int, k: int) -> int:
    """FLOPs of FluxTransformer2DModel's forward (matmuls and attention), written from the architecture."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    s = img + txt
    embed = _linear(1, 256, d) + _linear(1, d, d) + _linear(1, cfg["pooled_projection_dim"], d) + _linear(1, d, d)
    inputs = _linear(img, cfg["in_channels"], d) + _linear(txt, cfg["joint_attention_dim"], d)
    attention = 4 * s * s * d  # QK^T and PV over the joint sequence
    double = (2 * _linear(1, d, 6 * d)  # the two AdaLayerNormZero modulations
              + 4 * _linear(img, d, d) + 4 * _linear(txt, d, d)  # q, k, v, out per stream
              + attention + 2 * _linear(img, d, 4 * d) + 2 * _linear(txt, d, 4 * d))  # the two MLPs
    single = _linear(1, d, 3 * d) + 3 * _linear(s, d, d) + attention + _linear(s, d, 4 * d) + _linear(s, 5 * d, d)
    head = _linear(1, d, 2 * d) + _linear(img, d, cfg["in_channels"])
    split = 2 * _linear(img, d, k)  # C = F V and C V^T at the final site
    return embed + inputs + cfg["num_layers"] * double + cfg["num_single_layers"] * single + head + split


def test_flop_count_of_a_tiny_model_equals_the_hand_count():
    model = tiny_model(guidance=False)
    full, cached = FLUX.graphs(model, "final")
    k = 8
    x = FLUX.example_inputs(dict(model.config), TINY_SHAPES, seed=0)
    state = {**x, "timestep": torch.tensor([0.4]), "bases": random_bases(model, "final", k)}
    with torch.no_grad():
        _, state["coeffs"], state["residuals"] = full(*[state[n] for n in full.input_names])
    img, txt, d = TINY_SHAPES.img_tokens, TINY_SHAPES.text_len, TINY["num_attention_heads"] * TINY["attention_head_dim"]
    assert count_flops(full, [state[n] for n in full.input_names]) == hand_count_full(TINY, img, txt, k)
    cached_hand = (_linear(1, 256, d) + _linear(1, d, d) + _linear(1, TINY["pooled_projection_dim"], d)
                   + _linear(1, d, d) + _linear(img, k, d) + _linear(1, d, 2 * d) + _linear(img, d, TINY["in_channels"]))
    assert count_flops(cached, [state[n] for n in cached.input_names]) == cached_hand


# ---------------------------------------------------------------------------------- engines (slow tier)


@pytest.mark.parametrize("backend, hidden, twin, expected", [
    ("aoti", 128, False, {"full_step_vs_eager", "cached_vs_full_step", "e2e_speedup_vs_eager_uncached/issue 3"}),
    ("eager", 128, True, {"cached_vs_full_step", "e2e_speedup_vs_eager_uncached/issue 3"}),  # eager vs itself
    ("aoti", 3072, True, {"cached_vs_full_step", "e2e_speedup_vs_eager_uncached/issue 13",
                          "e2e_speedup_vs_eager_fp32_uncached", "full_step_fraction_of_peak"}),
    ("aoti", 3072, False, {"cached_vs_full_step", "e2e_speedup_vs_eager_uncached/issue 13",
                           "full_step_fraction_of_peak"}),
])
def test_bench_reports_only_the_targets_that_make_sense(backend, hidden, twin, expected):
    """Issue 3's targets at the bundled models' width, issue 13's at FLUX.1's (where a full step cannot be
    0.6x of an eager one that already runs at the matmul peak), none of an eager engine against itself."""
    from svdexport.bench.latency import TARGETS

    context = {"backend": backend, "hidden": hidden, "fp32_twin": twin}
    chosen = {t.ratio + (f"/{t.source}" if t.ratio == "e2e_speedup_vs_eager_uncached" else "")
              for t in TARGETS if t.applies(context)}
    assert chosen == expected


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aoti", pytest.param("inductor", marks=pytest.mark.extended)])
def test_bf16_engine_matches_eager_bf16(backend, tmp_path, capsys):
    """One full and one cached step of a bf16 engine against eager bf16: rel. L2 <= 1e-2 (bf16 rounding of
    differently fused kernels), C and R float32 alike; 50 steps of SVD-Cache within 35 dB of eager."""
    import svdexport
    from svdexport.bench.metrics import psnr, rel_l2

    out = tmp_path / "e"
    code, stdout, err = run_cli(capsys, "build", "--backend", backend, "--dtype", "bf16", "--out", out,
                                "--graphs", tmp_path / "g", *FAST)
    assert code == 0, err
    assert "dtype bf16: --dtype bf16" in stdout
    engine = svdexport.load(out)
    eager = engine.eager_reference()
    assert engine.dtype == eager.dtype == torch.bfloat16
    state = {**engine.example_inputs(3), "bases": engine.sampler.bases,
             "timestep": torch.tensor([0.37], dtype=torch.bfloat16)}
    want = eager.full(*[state[n] for n in eager.full.input_names])
    got = engine.full(*[state[n] for n in engine.full.input_names])
    assert [t.dtype for t in got] == [torch.bfloat16, torch.float32, torch.bfloat16]
    assert rel_l2(got[0], want[0]) <= 1e-2 and rel_l2(got[1], want[1]) <= 1e-2
    # R is the low-energy part: its bf16 difference is measured against the feature it belongs to.
    feature = want[1] @ state["bases"].unsqueeze(1).transpose(-1, -2) + want[2].float()
    assert float((got[2].float() - want[2].float()).norm() / feature.norm()) <= 1e-2
    state["coeffs"], state["residuals"] = want[1], want[2]
    assert rel_l2(engine.cached(*[state[n] for n in engine.cached.input_names]),
                  eager.cached(*[state[n] for n in eager.cached.input_names])) <= 1e-2
    x = engine.example_inputs(4)
    assert psnr(engine.generate(x, steps=50).latents, eager.generate(x, steps=50).latents) >= 35


@pytest.fixture(scope="module")
def eager_bf16(tmp_path_factory):
    from svdexport.cli import main

    out = tmp_path_factory.mktemp("bf16") / "e"
    assert main(["build", "--dtype", "bf16", "--out", str(out), *FAST]) == 0
    return out


@pytest.mark.slow
@pytest.mark.extended
def test_compare_sets_a_bf16_engine_against_fp32_full_compute(eager_bf16):
    from svdexport.bench.compare import compare

    result = compare(str(eager_bf16), samples=2, steps=10, intervals=(3,), peers=[], progress=False)
    rows = {r["method"]: r for r in result["rows"]}
    names = [r["method"] for r in result["rows"]]
    assert names[:2] == ["eager fp32 full compute", "eager bf16 full compute"]
    assert result["config"]["reference"] == "eager fp32 full compute" and rows[names[0]]["psnr_db"] == 99.0
    precision_loss = rows["eager bf16 full compute"]["psnr_db"]
    assert 30 < precision_loss < 99 and rows["eager bf16 full compute"]["full_steps"] == 10
    assert rows["SVD-Cache svd-fitted (engine)"]["psnr_db"] < precision_loss  # the cache adds to bf16's loss


@pytest.mark.slow
@pytest.mark.extended
def test_bench_of_a_bf16_eager_engine_reports_fp32_and_the_limit(eager_bf16):
    from svdexport.bench.latency import bench, format_report

    r = bench(str(eager_bf16), steps=6, repeats=1, step_calls=1, e2e_repeats=1, peak_repeats=1)
    assert r["eager_is_engine"] and "full_step_vs_eager" not in r["targets"]  # an eager engine against itself
    assert "e2e_speedup_vs_eager_fp32_uncached" in r["ratios"] and "eager_fp32_full" in r["step_seconds"]
    assert r["ratios"]["e2e_speedup_vs_eager_fp32_uncached"] == \
        r["e2e_seconds"]["eager_fp32_uncached"] / r["e2e_seconds"]["engine_cached"]
    lim = r["limit"]
    assert lim["full"]["flops_per_s"] == lim["full"]["flops"] / r["step_seconds"]["engine_full"]
    assert lim["peak"]["dtype"] == "bfloat16" and lim["full"]["flops"] > lim["cached"]["flops"]
    assert set(r["targets"]) == {"cached_vs_full_step", "e2e_speedup_vs_eager_uncached"}  # digits: issue 3's
    text = format_report(r)
    assert "| measurement | eager fp32 | eager bf16 | engine (eager) |" in text and "matmul peak" in text
