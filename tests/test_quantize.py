"""Quantized engines (issue 27): the scheme a build picks per device and GPU generation, its manifest record,
the conditioning GEMVs kept in the engine's dtype, the Inductor settings of each GEMM path, the one-line LoRA
refusal, and the GEMM path read from generated code. Speed and quality are measured in
scripts/experiments/int8_*.py (docs/int8.md), never timed here."""

import importlib.util
import re

import pytest
import torch

from helpers import TINY_SHAPES, random_bases, tiny_model
from svdexport.errors import SvdExportError
from svdexport.export import gemm_path
from svdexport.export import quantize as qz
from svdexport.models.flux import FLUX

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
needs_torchao = pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed (pip install torchao)")


@pytest.mark.parametrize("device, backend, cc, want", [
    ("cpu", "aoti", None, qz.PT2E_X86),
    ("cpu", "inductor", None, qz.PT2E_X86),
    ("cpu", "onnx", None, qz.ORT_DYNAMIC),
    ("cuda", "aoti", (9, 0), qz.TORCHAO_FP8),  # Hopper
    ("cuda", "inductor", (8, 9), qz.TORCHAO_FP8),
])
def test_auto_picks_fp8_where_the_gpu_has_it_and_int8_elsewhere(device, backend, cc, want):
    assert qz.choose_scheme("auto", device, backend, cc).method == want


@pytest.mark.parametrize("cc", [(7, 5), (8, 0), (8, 6)])
def test_gpus_without_fp8_get_int8_and_refuse_fp8_in_one_line(cc):
    assert qz.choose_scheme("auto", "cuda", "aoti", cc).method == qz.TORCHAO_INT8
    assert qz.choose_scheme("int8", "cuda", "aoti", cc).name == "int8"
    with pytest.raises(SvdExportError) as e:
        qz.choose_scheme("fp8", "cuda", "aoti", cc)
    assert "\n" not in str(e.value) and f"{cc[0]}.{cc[1]}" in str(e.value) and "--quantize int8" in str(e.value)


def test_int8_asked_on_an_fp8_gpu_is_int8():
    s = qz.choose_scheme("int8", "cuda", "aoti", (9, 0))
    assert (s.name, s.method, s.activations) == ("int8", qz.TORCHAO_INT8, "per-row, dynamic")


def test_the_conditioning_gemvs_are_quantized_on_a_cpu_and_kept_on_cuda():
    # CPU: PT2E would leave them in fp32, the slowest place for a weight-streaming GEMV (docs/int8.md)
    assert not qz.choose_scheme("int8", "cpu", "aoti").keep_conditioning
    assert qz.choose_scheme("fp8", "cuda", "aoti", (9, 0)).keep_conditioning
    assert qz.choose_scheme("int8", "cuda", "aoti", (8, 0)).keep_conditioning


@pytest.mark.parametrize("requested, device, backend, words", [
    ("fp8", "cpu", "aoti", "CUDA"),
    ("int8", "cpu", "eager", "aoti, inductor or onnx"),
    ("int8", "cpu", "tensorrt", "aoti, inductor or onnx"),
    ("int8", "cuda", "onnx", "--backend aoti"),
    ("int4", "cpu", "aoti", "choose from"),
])
def test_combinations_without_a_scheme_are_refused_in_one_line(requested, device, backend, words):
    with pytest.raises(SvdExportError) as e:
        qz.choose_scheme(requested, device, backend, (9, 0))
    assert "\n" not in str(e.value) and words in str(e.value)


def test_none_is_no_scheme():
    assert qz.choose_scheme("none", "cpu", "aoti") is None


def test_the_manifest_record_round_trips_and_refuses_malformed_records():
    s = qz.choose_scheme("fp8", "cuda", "aoti", (9, 0))
    s.kept = ["norm_out.linear", "time_text_embed.timestep_embedder.linear_1"]
    assert qz.QuantScheme.from_dict(s.to_dict()) == s and s.keep_conditioning
    assert qz.QuantScheme.from_dict(None) is None
    with pytest.raises(SvdExportError, match="malformed"):
        qz.QuantScheme.from_dict({"name": "int8"})


@pytest.fixture(scope="module")
def tiny_full_graph():
    model = tiny_model(guidance=True)
    full, cached = FLUX.graphs(model, "final")
    x = FLUX.example_inputs(dict(model.config), TINY_SHAPES, 0)
    x["bases"] = random_bases(model, "final", 8)
    x["timestep"] = torch.full((TINY_SHAPES.batch,), 0.5)
    return full, tuple(x[n] for n in full.input_names)


def test_conditioning_gemvs_are_found_by_their_rows_and_match_the_names_of_flux(tiny_full_graph):
    full, args = tiny_full_graph
    kept = qz.conditioning_linears(full, args, TINY_SHAPES.batch)
    linears = [n for n, m in full.named_modules() if isinstance(m, torch.nn.Linear)]
    by_name = [n for n in linears if qz.CONDITIONING_NAMES.search(n.removeprefix("transformer."))]
    assert kept == sorted(by_name)  # two independent rules agree on FLUX
    # every AdaLN modulation and embedder (2 double blocks x 2, 2 single, norm_out, 3 embedders x 2), and no
    # token linear (attention projections, MLPs, x/context embedders, proj_out)
    assert len(kept) == 2 * 2 + 2 + 1 + 3 * 2
    assert not any(re.search(r"(to_[qkvo]|ff|proj_out$|x_embedder|context_embedder)", n) for n in kept)


def test_inductor_settings_per_gemm_path():
    pt2e = qz.choose_scheme("int8", "cpu", "aoti")
    assert qz.inductor_configs(None) == {"aot_inductor.package_constants_in_so": False}
    assert qz.inductor_configs(pt2e)["freezing"] is True  # oneDNN's int8 fusion runs in freezing only
    cpp = qz.inductor_configs(None, "cpp", weights_bound=False)
    assert cpp["max_autotune"] and "CPP" in cpp["max_autotune_gemm_backends"].split(",")
    assert cpp["aot_inductor.package_constants_in_so"] is True
    with pytest.raises(SvdExportError, match="choose from aten, cpp"):
        qz.inductor_configs(None, "triton")


def test_a_lora_on_a_quantized_engine_is_refused_in_one_line():
    qz.refuse_lora(None)  # not quantized: nothing to refuse
    with pytest.raises(SvdExportError) as e:
        qz.refuse_lora(qz.choose_scheme("int8", "cpu", "aoti"))
    assert "\n" not in str(e.value) and "int8" in str(e.value) and "build again" in str(e.value)


@pytest.mark.parametrize("code, first", [
    ("aoti_torch_cpu__qlinear_pointwise_tensor(...); aoti_torch_cpu_bmm_out(...)", "oneDNN int8"),
    ("aoti_torch_cpu__linear_pointwise(buf0, ...)", "oneDNN (linear"),
    ("_micro_gemm_amx_kernel_32_2<...>; _tile_dpbf16ps", "Inductor CPP template (AMX)"),
    ("aoti_torch_cpu__int_mm_out(buf1, ...)", "aten int8"),
    ("aoti_torch_cpu_addmm_out(buf2, ...)", "aten (addmm"),
    ("extern_kernels.mm(buf0, arg1_1, out=buf1)", "aten (addmm"),
])
def test_the_gemm_path_is_read_from_generated_code(code, first):
    paths = gemm_path.gemm_paths(code)
    assert paths and paths[0].startswith(first)
    assert gemm_path.describe(paths).startswith(f"GEMM path: {paths[0]}")


def test_code_without_a_gemm_names_none():
    assert gemm_path.gemm_paths("cpp_fused_add_mul_0(buf0)") == []
    assert "not recognised" in gemm_path.describe([])


@needs_torchao
def test_pt2e_quantizes_token_linears_and_keeps_the_conditioning_gemvs(tiny_full_graph):
    full, args = tiny_full_graph
    kept = qz.conditioning_linears(full, args, TINY_SHAPES.batch)
    gm = qz.quantize_pt2e(full, args, kept)
    weights_quantized = [n for n in gm.graph.nodes if n.op == "call_function"
                         and "dequantize_per_channel" in str(n.target)]
    token_linears = [n for n, m in full.named_modules() if isinstance(m, torch.nn.Linear) and n not in kept]
    assert len(weights_quantized) == len(token_linears)  # one per-channel int8 weight per token linear
    with torch.no_grad():
        ref, out = full(*args)[0], gm(*args)[0]
    # int8 with per-tensor activations on a random tiny model: within a few percent of fp32 (measured 1-3%)
    assert float((out - ref).norm() / ref.norm()) < 0.1


@needs_torchao
def test_fp8_config_is_torchaos_per_row_float8():
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Int8DynamicActivationInt8WeightConfig,
                                      PerRow)

    fp8 = qz.torchao_config(qz.choose_scheme("fp8", "cuda", "aoti", (9, 0)))
    assert isinstance(fp8, Float8DynamicActivationFloat8WeightConfig)
    assert all(isinstance(g, PerRow) for g in (fp8.granularity if isinstance(fp8.granularity, (list, tuple))
                                               else [fp8.granularity]))
    assert isinstance(qz.torchao_config(qz.choose_scheme("int8", "cuda", "aoti", (8, 0))),
                      Int8DynamicActivationInt8WeightConfig)
    with pytest.raises(SvdExportError):
        qz.torchao_config(qz.choose_scheme("int8", "cpu", "aoti"))


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= qz.FP8_CAPABILITY
                         and HAS_TORCHAO), reason="needs a CUDA GPU of compute capability 8.9+ and torchao")
def test_fp8_linear_on_the_gpu_is_close_to_bf16():
    lin = torch.nn.Linear(256, 256).cuda().to(torch.bfloat16).eval()
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    ref = lin(x)
    scheme = qz.choose_scheme("fp8", "cuda", "aoti")
    q = qz.quantize_torchao(torch.nn.Sequential(lin), scheme)
    out = q(x)
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 0.1


# ---------------------------------------------------------------- derived constants, rebuilt at load


def _frozen_package(tmp_path, module, x, configs):
    """An AOTInductor package of `module` compiled with `configs` (freezing), its constants not in the
    package, the compile's derived constants captured; then loaded fresh and bound from the program's constants
    and the replayed recipes (a JSON round trip, as an engine's file would hold them)."""
    import json

    from torch._inductor import aoti_compile_and_package, aoti_load_package

    from svdexport.export import derived

    program = torch.export.export(module, (x,))
    own = {**program.state_dict, **program.constants}
    with torch.no_grad(), derived.capture(own) as captured:
        path = aoti_compile_and_package(program, package_path=str(tmp_path / "m.pt2"), inductor_configs=configs)
    recipes = json.loads(json.dumps(captured.recipes))
    package = aoti_load_package(path)
    names = derived.constant_names(path, tmp_path / "so")
    made = {**derived.replay(recipes, own), **captured.unrecipted}
    package.keep = derived.bind_by_name(package, names, own, made)
    return package, captured, path


def test_frozen_bf16_weights_are_prepacked_at_load_from_the_bound_checkpoint_weights(tmp_path):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).eval()
    mlp = mlp.to(torch.bfloat16)
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    package, captured, path = _frozen_package(tmp_path, mlp, x, {**qz.inductor_configs(None), "freezing": True})
    # each linear's prepacked weight is derived from the checkpoint's own tensor by a recipe, none kept as a copy
    assert not captured.unrecipted
    assert sum(r[-1][0] == "mkldnn._reorder_linear_weight" for r in captured.recipes.values()) == 2
    sources = {s["fqn"] for r in captured.recipes.values() for step in r for s in step[1] if isinstance(s, dict)
               and "fqn" in s}
    assert {"0.weight", "2.weight"} <= sources
    assert gemm_path.gemm_paths(gemm_path.package_code(path))[0].startswith("oneDNN (linear")
    with torch.no_grad():
        out, ref = package(x), mlp(x)
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 2e-2  # bf16 rounding, not layout


def test_a_recipe_calling_an_op_outside_the_allowlist_is_refused_in_one_line():
    from svdexport.export import derived

    with pytest.raises(SvdExportError) as e:
        derived.replay({"c0": [["aten.exp.default", [{"fqn": "w"}], {}]]}, {"w": torch.ones(2)})
    assert "\n" not in str(e.value) and "aten.exp.default" in str(e.value)
    with pytest.raises(SvdExportError, match="needs the weight w2"):
        derived.replay({"c0": [["aten.t.default", [{"fqn": "w2"}], {}]]}, {"w": torch.ones(2, 2)})


@needs_torchao
def test_pt2e_int8_package_binds_int8_weights_and_prepacks_them_at_load(tmp_path):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).eval()
    x = torch.randn(1, 16, 64)
    gm = qz.quantize_pt2e(mlp, (x,), [])
    scheme = qz.choose_scheme("int8", "cpu", "aoti")
    package, captured, path = _frozen_package(tmp_path, gm, x, qz.inductor_configs(scheme))
    ops = {step[0] for r in captured.recipes.values() for step in r}
    assert {op.rsplit(".default", 1)[0] for op in ops} == {"onednn.qlinear_prepack"} and len(captured.recipes) == 2
    assert gemm_path.gemm_paths(gemm_path.package_code(path))[0].startswith("oneDNN int8")
    with torch.no_grad():
        out, ref = package(x), gm(x)
    assert float((out - ref).norm() / ref.norm()) < 1e-2  # the same int8 math as the converted graph
