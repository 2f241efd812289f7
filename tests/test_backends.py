"""Compiled backends against eager: graph parity, 50-step generations, loading without model code. The aoti and
onnx engines are ranged (issue 15): optimised for FAST's 128x128, batch 1, serving 96..160 px and batch 1..2;
the inductor one is static (a ranged inductor engine compiles at every load, slowly: its own test below)."""

import contextlib
import importlib.util
import io
import json
import re
import runpy
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import FAST, check_lora_engine, digits_model, make_lora
import svdexport
from svdexport.bench.metrics import psnr
from svdexport.cli import main
from svdexport.errors import SvdExportError
from torch._dynamo.utils import counters

pytestmark = pytest.mark.slow  # engines of every backend or whole pipelines: the full suite only

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
CPU_BACKENDS = [
    "aoti",
    "inductor",
    pytest.param("onnx", marks=pytest.mark.skipif(not HAS_ONNX, reason="onnx extra not installed")),
]


RANGE = ["--min-height", "96", "--max-height", "160", "--min-width", "96", "--max-width", "160", "--max-batch", "2"]
BUILD_LOGS: dict[str, str] = {}  # backend -> what its build wrote to stderr


@pytest.fixture(scope="module", params=CPU_BACKENDS)
def built(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    out = root / "engine"
    ranged = RANGE if request.param != "inductor" else []
    with contextlib.redirect_stderr(io.StringIO()) as log:
        code = main(["build", "--backend", request.param, "--out", str(out), "--graphs", str(root / "graphs"), *FAST,
                     *ranged])
    BUILD_LOGS[request.param] = log.getvalue()
    sys.stderr.write(log.getvalue())
    assert code == 0
    engine = svdexport.load(out)
    return request.param, out, engine, engine.eager_reference()


PHASES = {  # issue 26: every phase that can take more than a few seconds, announced with its elapsed time
    "aoti": ["exporting the full graph (torch.export)", "exporting the cached graph (torch.export)",
             "compiling the full graph (AOTInductor)", "compiling the cached graph (AOTInductor)"],
    "inductor": ["exporting the full graph (torch.export)", "exporting the cached graph (torch.export)"],
    "onnx": [f"{what} the {graph} {kind}" for graph in ("full", "cached") for what, kind in
             (("exporting", "graph to ONNX"), ("checking", "ONNX model (onnx.checker)"),
              ("optimizing", "ONNX model (ONNX Runtime's transformer optimizer)"))],
}


def test_the_build_announces_each_long_phase_with_its_time(built):
    lines = BUILD_LOGS[built[0]].splitlines()
    for phase in PHASES[built[0]]:
        assert sum(bool(re.fullmatch(re.escape(phase) + r" \.\.\. \d+\.\d s", line)) for line in lines) == 1, phase


def one_step_state(engine, eager_full, seed=1, shapes=None):  # inputs of one step, C and R from eager
    inputs = engine.example_inputs(seed, shapes=shapes)
    b = inputs["hidden_states"].shape[0]
    state = {**inputs, "bases": engine.sampler.bases, "timestep": torch.full((b,), 0.37)}
    with torch.no_grad():
        out = eager_full(*[state[n] for n in eager_full.input_names])
    state["coeffs"], state["residuals"] = out[1], out[2]
    return state, out


@pytest.mark.parametrize("shape", [None, (2, 96, 160), (1, 160, 112)], ids=["build", "b2-96x160", "b1-160x112"])
def test_each_graph_matches_eager_within_1e4_of_output_scale(built, shape):
    _, _, engine, eager = built
    if shape and not engine.range.ranged:
        pytest.skip("a static engine (the ranged inductor engine: test_ranged_inductor_engine_matches_eager)")
    eager_full, eager_cached = eager.full, eager.cached
    shapes = engine.request_shapes(*shape) if shape else None
    state, expected = one_step_state(engine, eager_full, shapes=shapes)
    got = engine.full(*[state[n] for n in engine.full.input_names])
    for name, a, b in zip(("noise_pred", "coeffs", "residuals"), got, expected):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max(), name
    with torch.no_grad():
        want = eager_cached(*[state[n] for n in eager_cached.input_names])
    got = engine.cached(*[state[n] for n in engine.cached.input_names])
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_50_step_svd_cache_generation_matches_eager(built):
    _, out, engine, reference = built
    inputs = engine.example_inputs(seed=4)
    a = engine.generate(inputs, steps=50)
    b = reference.generate(inputs, steps=50)
    assert (a.full_steps, a.cached_steps) == (9, 41)
    assert psnr(a.latents, b.latents) >= 40


def test_engine_files_are_hashed_and_graphs_exported(built):
    backend, out, engine, _ = built
    m = engine.manifest
    assert m.backend == backend and m.device == "cpu"
    engine_files = {p.name for p in out.iterdir()} - {"manifest.json"}
    assert set(m.files) == engine_files and len(engine_files) >= 3
    graphs = out.parent / "graphs"
    assert (graphs / "full.pt2").exists() and (graphs / "cached.pt2").exists()
    ranged = backend != "inductor"
    assert m.graphs["full"].input_shapes[0] == [2 if ranged else 1, 64, 4]  # ranged: batch 1 would not be dynamic
    assert m.shapes.kind.value == ("ranged" if ranged else "static") and m.shapes.inputs["hidden_states"] == [1, 64, 4]
    # The cached-step engine carries far fewer weights than the full one.
    assert m.graphs["cached"].parameters < m.graphs["full"].parameters / 2


@pytest.mark.extended
def test_ranged_inductor_engine_matches_eager(tmp_path_factory):
    root = tmp_path_factory.mktemp("inductor-ranged")
    assert main(["build", "--backend", "inductor", "--out", str(root / "e"), "--graphs", str(root / "g"), *FAST,
                 *RANGE]) == 0
    engine = svdexport.load(root / "e")
    eager = engine.eager_reference()
    compiled = counters["stats"]["unique_graphs"]
    for shape in ((2, 96, 160), (1, 160, 112)):
        state, expected = one_step_state(engine, eager.full, shapes=engine.request_shapes(*shape))
        got = engine.full(*[state[n] for n in engine.full.input_names])
        for name, a, b in zip(("noise_pred", "coeffs", "residuals"), got, expected):
            assert (a - b).abs().max() <= 1e-4 * b.abs().max(), (shape, name)
        with torch.no_grad():
            want = eager.cached(*[state[n] for n in eager.cached.input_names])
        got = engine.cached(*[state[n] for n in engine.cached.input_names])
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), shape
        if shape[0] == 2:  # the load compiled the whole range (autograd on here: still no new compile)
            assert counters["stats"]["unique_graphs"] == compiled
    with pytest.raises(SvdExportError, match=re.escape("batch 3 is outside this ranged engine's range: batch 1..2")):
        engine.generate(batch=3, steps=3)


def test_corrupted_engine_file_is_refused(built, tmp_path):
    _, out, engine, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    victim = max((p for p in copy.iterdir() if p.name != "manifest.json"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(SvdExportError, match="corrupted"):
        svdexport.load(copy)


def test_other_shapes_and_batches_generate_as_eager_and_out_of_range_is_refused(built):
    _, _, engine, reference = built
    if not engine.range.ranged:  # static: another shape is refused naming the built one
        inputs = engine.example_inputs()
        built_shape = tuple(inputs["encoder_hidden_states"].shape)
        inputs["encoder_hidden_states"] = torch.zeros(1, 9, built_shape[2])
        with pytest.raises(SvdExportError, match=re.escape(f"built for {built_shape}")):
            engine.generate(inputs, steps=3)
        return
    for batch, height, width in ((2, 96, 160), (1, 160, 112)):
        inputs = engine.example_inputs(seed=4, shapes=engine.request_shapes(batch, height, width))
        a = engine.generate(inputs, steps=10, height=height, width=width)
        b = reference.generate(inputs, steps=10, height=height, width=width)
        assert a.latents.shape == (batch, height * width // 256, 4)
        assert psnr(a.latents, b.latents) >= 40
    inputs = engine.example_inputs()
    inputs["encoder_hidden_states"] = torch.zeros(1, 9, inputs["encoder_hidden_states"].shape[2])
    with pytest.raises(SvdExportError, match=re.escape("text_len 9 is outside this ranged engine's range: text_len 8 only")):
        engine.generate(inputs, steps=3)
    with pytest.raises(SvdExportError, match=re.escape("height 176 is outside this ranged engine's range: height 96..160")):
        engine.generate(height=176, steps=3)


@pytest.fixture(scope="module")
def without_model_code(built, tmp_path_factory):
    """One interpreter per backend in which diffusers' FLUX transformer cannot be imported: it loads the engine
    and generates, then runs scripts/example_generate.py as its __main__ (a fresh interpreter for each cost
    4-12 s more: Python, torch and diffusers start again, and an inductor engine loads again)."""
    _, out, _, _ = built
    pngs = tmp_path_factory.mktemp("example")
    example = Path(__file__).parent.parent / "scripts" / "example_generate.py"
    script = textwrap.dedent(f"""
        import runpy
        import sys
        class Block:  # any import of diffusers' FLUX transformer module fails
            def find_spec(self, fullname, path=None, target=None):
                if fullname == "diffusers.models.transformers.transformer_flux":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import svdexport
        from svdexport.errors import SvdExportError
        engine = svdexport.load({str(out)!r})
        result = engine.generate(seed=0, steps=5)
        print("ok", result.full_steps, result.cached_steps)
        from torch._dynamo.utils import counters
        print("graphs compiled", counters["stats"]["unique_graphs"])  # inductor: at load only, not by generate
        sys.argv = [{str(example)!r}, {str(out)!r}, "--seeds", "0", "1", "--steps", "6", "--out", {str(pngs)!r}]
        runpy.run_path(sys.argv[0], run_name="__main__")
        try:
            from diffusers import FluxTransformer2DModel
        except Exception:  # diffusers' lazy module turns the ImportError into a RuntimeError
            print("transformer blocked")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    return proc, pngs


def test_loads_and_runs_without_the_diffusers_transformer(built, without_model_code):
    backend = built[0]
    proc, _ = without_model_code
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ok 3 2" in proc.stdout and "transformer blocked" in proc.stdout  # 5 steps: warmup 3
    assert f"graphs compiled {2 if backend == 'inductor' else 0}" in proc.stdout
    if backend == "inductor":  # the compile at load says so: a first load sat silent for 91 s before
        for graph in ("full", "cached"):
            assert f"compiling the {graph} graph (Inductor, at load" in proc.stderr, proc.stderr[-2000:]


def test_rebuild_with_same_settings_reuses_and_other_settings_rebuild(tmp_path, capsys):
    # The build key does not depend on the backend: the eager one keeps the two builds cheap.
    out = tmp_path / "e"
    args = ["build", "--backend", "eager", "--out", str(out), "--graphs", str(tmp_path / "g"), *FAST]
    assert main(args) == 0
    stamp = (out / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    assert main([*args, "--interval", "5"]) == 0
    assert json.loads((out / "manifest.json").read_text())["cache"]["interval"] == 5


def test_missing_runtime_is_one_line(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real(n, *a))
    code = main(["build", "--backend", "onnx", "--out", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "onnxruntime" in err[0] and "svdexport[onnx]" in err[0]
    assert not (tmp_path / "o").exists()


TRT = importlib.util.find_spec("torch_tensorrt") is not None and torch.cuda.is_available()


@pytest.mark.skipif(not TRT, reason="TensorRT needs torch-tensorrt and a CUDA GPU")
@pytest.mark.parametrize("ranged", [False, True], ids=["static", "ranged"])
def test_tensorrt_matches_eager(tmp_path, ranged):
    out = tmp_path / "trt"
    assert main(["build", "--backend", "tensorrt", "--device", "cuda", "--out", str(out),
                 "--graphs", str(tmp_path / "g"), *FAST, *(RANGE if ranged else [])]) == 0
    engine = svdexport.load(out)
    eager_full = engine.eager_reference().full
    for shape in [None] + ([(2, 96, 160), (1, 160, 112)] if ranged else []):  # optimisation profile: any in range
        state, expected = one_step_state(engine, eager_full, shapes=engine.request_shapes(*shape) if shape else None)
        got = engine.full(*[state[n] for n in engine.full.input_names])
        assert (got[0] - expected[0]).abs().max() <= 1e-3 * expected[0].abs().max()


def test_tensorrt_without_gpu_is_one_line(tmp_path, capsys):
    if TRT:
        pytest.skip("a GPU and torch-tensorrt are present")
    code = main(["build", "--backend", "tensorrt", "--out", str(tmp_path / "t"), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "tensorrt" in err[0].lower()


def test_run_command_works_for_the_backend(built, tmp_path, capsys):
    _, out, _, _ = built
    png = tmp_path / "x.png"
    assert main(["run", str(out), "--steps", "12", "--out", str(png)]) == 0
    assert "12 steps: 4 full, 8 cached" in capsys.readouterr().out  # steps 0-2 and 9
    assert png.exists() and png.with_suffix(".safetensors").exists()


def test_example_script_loads_and_generates_a_batch_of_seeds(without_model_code):
    """scripts/example_generate.py run as __main__ (in without_model_code's interpreter: no model code)."""
    proc, pngs = without_model_code
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"seed 1: \d+ full \+ \d+ cached steps", proc.stdout)  # its own report, seed after seed
    assert sorted(p.name for p in pngs.glob("*.png")) == ["seed0.png", "seed1.png"]


def test_check_parity_script(built, capsys, monkeypatch):
    backend, out, _, _ = built
    script = Path(__file__).parent.parent / "scripts" / "check_parity.py"
    monkeypatch.setattr(sys, "argv", [str(script), str(out)])
    runpy.run_path(str(script), run_name="__main__")  # as __main__ in this process (a new one cost 5-13 s)
    diffs = [float(m) for m in re.findall(r"max\|d\|/scale ([0-9.e+-]+)", capsys.readouterr().out)]
    assert len(diffs) == 4 and max(diffs) <= 1e-4  # noise_pred, coeffs, residuals, cached noise_pred


def test_lora_loads_without_a_rebuild(built, tmp_path):
    """A PEFT LoRA (rank 4, random B) pushed into the compiled engine: changes it, equals eager with the LoRA
    fused within the parity tolerance, stacks, unloads to the base output bit for bit (test_lora.py: the rest)."""
    check_lora_engine(built[2], make_lora(tmp_path / "adapter.safetensors", digits_model()), 1e-4)
