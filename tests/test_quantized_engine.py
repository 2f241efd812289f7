"""`build --quantize` in the product (issue 27, item 1): an int8 aoti engine of the bundled FLUX model (one build,
shared) and of HunyuanVideo, within int8 error of the fp32 engine's math, its scheme and files in the manifest,
LoRAs and changed files refused; the CLI's refusals; the CUDA (torchao) path run on a CPU. Speed and quality
gates are measured in scripts/experiments/int8_*.py (docs/int8.md), never timed here."""

import importlib.util

import pytest
import torch

from helpers import TINY_SHAPES, random_bases, tiny_model
from svdexport.errors import SvdExportError
from svdexport.export import quantize as qz
from svdexport.models.flux import FLUX

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
needs_torchao = pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed (pip install torchao)")

INT8_TOL = 5e-2  # rel. L2 of int8 (dynamic per-tensor activations, per-channel weights) against fp32: measured 1e-3-1e-2


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def int8_engine(tmp_path_factory):
    """One int8 aoti engine of the bundled FLUX model, shared by the tests below (the build is the slow part)."""
    from svdexport.cli import main

    from helpers import FAST

    out = tmp_path_factory.mktemp("int8") / "engine"
    assert main(["build", "--backend", "aoti", "--quantize", "int8", "--out", str(out), "--graphs",
                 str(out.parent / "graphs"), *FAST, "--calib-steps", "2"]) == 0
    return out


@needs_torchao
def test_the_int8_engine_records_its_scheme_and_every_file_it_loads(int8_engine):
    from svdexport.runtime import manifest as mf

    m = mf.read(int8_engine, hash_files=False)
    q = qz.QuantScheme.from_dict(m.backend_options["quantization"])
    assert (q.name, q.method, q.activations, q.weights) == ("int8", qz.PT2E_X86, "per-tensor, dynamic",
                                                           "per-channel, symmetric")
    assert m.dtype == "float32"  # PT2E quantizes the fp32 model; fp32 between the int8 linears
    from svdexport.runtime.engine import load

    engine = load(int8_engine)
    linears = sum(isinstance(x, torch.nn.Linear) for x in engine.eager_reference().full.modules())
    assert q.linears == linears > 0 and not q.kept  # every linear, the conditioning GEMVs too
    # the recipes, the derived tensors, the int8 weights' file and the packages: listed, hence hashed at load
    for graph in ("full", "cached"):
        for kind in ("packages", "derived", "derived_tensors"):
            assert m.backend_options[kind][graph] in m.files
    assert m.bound.constants in m.files
    assert m.backend_options["gemm_path"][0].startswith("oneDNN int8")
    from svdexport.bench.latency import engine_gemm_path

    assert engine_gemm_path(engine).startswith("GEMM path: oneDNN int8") and "int8" in engine_gemm_path(engine)
    engine.close()


@needs_torchao
def test_the_int8_engine_is_within_int8_error_of_fp32_and_quantized(int8_engine):
    import svdexport

    engine = svdexport.load(int8_engine)
    ref = engine.eager_reference()  # the same weights, bases and plan in fp32 eager: what an fp32 engine computes
    x = engine.example_inputs(0)
    a = engine.generate(x, steps=4, interval=1).latents
    b = ref.generate(x, steps=4, interval=1).latents
    assert 1e-5 < _rel(a, b) < INT8_TOL  # int8 error, not fp32 rounding (1e-6) nor a broken graph
    a, b = engine.generate(x, steps=4).latents, ref.generate(x, steps=4).latents  # SVD-Cache: the cached graph too
    assert 1e-5 < _rel(a, b) < INT8_TOL
    engine.close()


@needs_torchao
@pytest.mark.extended
def test_an_int8_hunyuanvideo_engine_is_within_int8_error_of_fp32(tmp_path):
    """HunyuanVideo's graphs quantize too (its fp32 Conv3d patch embedder stays fp32, prepacked at load)."""
    import svdexport
    from svdexport.cli import main

    out = tmp_path / "engine"
    assert main(["build", "--backend", "aoti", "--quantize", "int8", "--model", "hunyuanvideo", "--out", str(out),
                 "--graphs", str(tmp_path / "graphs"), "--calib-samples", "1", "--calib-steps", "2"]) == 0
    engine = svdexport.load(out)
    ref = engine.eager_reference()
    x = engine.example_inputs(0)
    for cache in ({"interval": 1}, {}):  # full compute, and SVD-Cache
        a, b = engine.generate(x, steps=4, **cache).latents, ref.generate(x, steps=4, **cache).latents
        assert 1e-5 < _rel(a, b) < INT8_TOL  # measured 4e-3
    engine.close()


@needs_torchao
def test_a_lora_on_the_int8_engine_is_refused_in_one_line(int8_engine, tmp_path, capsys):
    import svdexport
    from helpers import assert_one_line_error, digits_model, make_lora, run_cli

    lora = make_lora(tmp_path / "l.safetensors", digits_model())
    engine = svdexport.load(int8_engine)
    with pytest.raises(SvdExportError) as e:
        engine.load_lora(lora)
    assert "\n" not in str(e.value) and "quantized (int8" in str(e.value) and "build again" in str(e.value)
    engine.close()
    code, _, err = run_cli(capsys, "run", int8_engine, "--lora", lora, "--out", tmp_path / "o.png")
    assert_one_line_error(code, err, "--lora", "quantized (int8")
    assert not (tmp_path / "o.png").exists()


@needs_torchao
@pytest.mark.parametrize("name", ["constants.safetensors", "full.derived.json", "cached.derived.safetensors"])
def test_a_changed_int8_engine_file_is_refused_at_load(int8_engine, tmp_path, name):
    import shutil

    import svdexport

    copy = tmp_path / "e"
    shutil.copytree(int8_engine, copy)
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 1
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(SvdExportError) as e:
        svdexport.load(copy)
    assert "\n" not in str(e.value) and name in str(e.value)


@pytest.mark.parametrize("argv, words", [
    (["--backend", "onnx", "--quantize", "int8"], ["--backend aoti"]),
    (["--backend", "eager", "--quantize", "int8"], ["--backend aoti"]),
    (["--backend", "inductor", "--quantize", "int8"], ["--backend aoti"]),
    (["--backend", "aoti", "--quantize", "fp8", "--device", "cpu"], ["fp8", "CUDA"]),
    (["--backend", "aoti", "--quantize", "int8", "--dtype", "bf16"], ["fp32", "--dtype bf16"]),
    (["--backend", "aoti", "--quantize", "int4"], ["choose from"]),
])
def test_the_cli_refuses_quantize_combinations_without_a_shipped_scheme(tmp_path, capsys, argv, words):
    from helpers import FAST, assert_one_line_error, run_cli

    code, _, err = run_cli(capsys, "build", "--out", tmp_path / "e", "--graphs", tmp_path / "g", *FAST, *argv)
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "e").exists()


def test_quantize_enters_the_build_key_and_memory_estimate_only_when_used():
    from svdexport.builder import quantized
    from svdexport.builder.build import BuildOptions

    plain = BuildOptions(backend="aoti", device="cpu").validate()
    assert quantized.key_parts(plain) == {} and quantized.weight_copies(plain) == 1.1  # aoti's own
    if not HAS_TORCHAO:
        return
    int8 = BuildOptions(backend="aoti", device="cpu", quantize="int8").validate()
    assert quantized.key_parts(int8) == {"quantize": "int8"} and int8.dtype == "fp32"
    assert quantized.weight_copies(int8) * 4 == 8.0  # ~8 bytes per parameter measured (docs/int8.md)
    auto = BuildOptions(backend="onnx", device="cpu", quantize="auto").validate()
    assert auto.quantize == "none"  # auto: the best the device has on this backend, here none
    assert BuildOptions(backend="aoti", device="cpu", quantize="auto").validate().quantize == "int8"


def test_older_aoti_engines_take_loras_and_quantized_ones_refuse_them():
    from svdexport.export.aoti import BACKEND

    assert BACKEND.weights_refusal({"packages": {"full": "full.aoti.pt2"}}) is None  # before issue 27
    record = qz.choose_scheme("int8", "cpu", "aoti").to_dict()
    assert "quantized (int8" in BACKEND.weights_refusal({"quantization": record})


@needs_torchao
def test_the_cuda_path_keeps_the_conditioning_gemvs_and_quantizes_the_rest():
    """builder/quantized.py's torchao path (fp8 on Ada/Hopper, int8 on older GPUs), run on a CPU with its int8
    scheme (fp8 matmuls need a GPU): the conditioning GEMVs keep plain float weights, every other linear is
    quantized, and the graph stays within int8 error of the float one."""
    from svdexport.builder.quantized import quantize_transformer

    model = tiny_model(guidance=True)
    full, _ = FLUX.graphs(model, "final")
    x = FLUX.example_inputs(dict(model.config), TINY_SHAPES, 0)
    x["bases"] = random_bases(model, "final", 8)
    x["timestep"] = torch.full((TINY_SHAPES.batch,), 0.5)
    args = tuple(x[n] for n in full.input_names)
    with torch.no_grad():
        ref = full(*args)[0]
    scheme = qz.choose_scheme("int8", "cuda", "aoti", (8, 0))
    quantize_transformer(model, full, args, TINY_SHAPES.batch, scheme)
    kept = set(scheme.kept)
    assert kept and all(not k.startswith("transformer.") for k in kept)
    assert all(qz.CONDITIONING_NAMES.search(k) for k in kept)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    plain = {n for n, m in linears.items() if type(m.weight) is torch.nn.Parameter and m.weight.dtype.is_floating_point
             and not torch.nn.utils.parametrize.is_parametrized(m)}
    assert plain == kept and scheme.linears == len(linears) - len(kept)
    with torch.no_grad():
        out = full(*args)[0]
    assert 1e-5 < _rel(out, ref) < 0.1
