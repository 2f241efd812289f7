"""scripts/gpu_check.sh: its logic on a CPU (--tiny), its table, and its refusals, so that the first run on a
lent GPU is not its first run."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up while the script loads
spec.loader.exec_module(gpu_check)


def test_table_has_one_row_per_backend_and_names_skips():
    from svdexport.hardware import Peak

    rows = [gpu_check.Row("aoti", "bf16", parity={"full": 3e-3, "cached": 1e-3}, parity_ok=True, full_ms=8.25,
                          cached_ms=0.41, cached_50_s=0.112, eager_uncached_50_s=0.62, speedup=5.54, tflops=640.0,
                          fraction_of_peak=0.81, peak_memory_gib=3.5, build_s=95.0),
            gpu_check.Row("tensorrt", skipped="backend 'tensorrt' needs torch_tensorrt, which is not installed")]
    peaks = {"bfloat16": Peak(790e12, (4096, 3072, 3072), "bfloat16", "cuda")}
    text = gpu_check.table(rows, gpu_check.GPU, "NVIDIA H100 80GB HBM3", peaks)
    lines = text.splitlines()
    assert "on NVIDIA H100 80GB HBM3" in lines[0] and "bfloat16 matmul peak 790.00 TFLOP/s at 4096x3072x3072" in lines[0]
    header, aoti, trt = lines[2], lines[4], lines[5]
    assert header.count("|") == aoti.count("|") == trt.count("|") == 13
    assert "| aoti | bf16 | 3.0e-03 / 1.0e-03 (ok) | 8.25 | 0.41 | 0.112 | 0.620 | 5.54x | 640.000 | 81% | 3.50 | 95 |" == aoti
    assert "skipped: backend 'tensorrt' needs torch_tensorrt" in trt and "peak GPU memory GiB" in header
    assert gpu_check.lora_table(rows) == ""  # no LoRA step ran: no second table


def test_the_lora_table_has_a_row_per_lora_step():
    """The GPU plan's LoRA step is tensorrt's refit (aoti and onnx take theirs on the CPU); its table."""
    assert gpu_check.GPU.lora == ("tensorrt",) and gpu_check.TINY.lora == ("aoti", "onnx")
    step = {"load_s": 1.234, "unload_s": 0.5, "weights": 34, "parity": {"full": 3e-3, "cached": 2e-3},
            "change": 0.31, "exact_unload": True, "ok": True}
    rows = [gpu_check.Row("tensorrt", "bf16", lora=step), gpu_check.Row("aoti", "bf16", lora_skipped="time budget"),
            gpu_check.Row("onnx", skipped="no CUDA provider")]
    lines = gpu_check.lora_table(rows).splitlines()
    assert len(lines) == 4 and all(line.count("|") == 7 for line in lines)
    assert lines[2] == "| tensorrt | 1.23 | 0.50 | 3.0e-03 / 2.0e-03 (ok) | 3.10e-01 | yes |"
    assert lines[3].startswith("| aoti | time budget |")


def test_a_backend_that_cannot_run_is_skipped_with_its_reason(tmp_path):
    reason = gpu_check.unavailable("tensorrt", "cpu")
    assert reason and ("CUDA GPU" in reason or "torch_tensorrt" in reason)
    plan = gpu_check.dataclasses.replace(gpu_check.TINY, budget_s=0.0)
    row = gpu_check.Check(plan, tmp_path, log=lambda s: None).run_backend("aoti")
    assert row.skipped.startswith("time budget") and not list(tmp_path.iterdir())  # nothing was built


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_gpu_mode_without_a_gpu_is_one_line(capsys):
    assert gpu_check.main(["--out", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("svdexport: error: no CUDA GPU is visible")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_the_script_refuses_a_machine_without_a_gpu_before_installing_anything():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().startswith("svdexport: error: no CUDA GPU is visible") and "\n" not in proc.stderr.strip()


@pytest.mark.slow
@pytest.mark.extended
def test_tiny_mode_runs_the_whole_check_on_this_cpu(tmp_path):
    """The script end to end on a CPU, one backend in its child process: onnx in the fp32 --dtype auto picks
    for it, each step within tolerance of eager, its LoRA step, the tables. (The tiny plan's aoti row builds the bf16 engine
    that tests/test_precision.py already checks against eager bf16; running it here too cost 35 s.)"""
    assert gpu_check.TINY.dtypes["aoti"] == "bf16" and gpu_check.TINY.backends == ("aoti", "onnx")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--tiny", "--backends", "onnx",
                           "--out", str(tmp_path / "e"), "--json", str(tmp_path / "rows.json")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    saved = json.loads((tmp_path / "rows.json").read_text())
    rows = {r["backend"]: r for r in saved["rows"]}
    assert set(rows) == {"onnx"} and not rows["onnx"]["skipped"] and rows["onnx"]["dtype"] == "fp32"
    r = rows["onnx"]
    assert r["parity_ok"] and r["full_ms"] > r["cached_ms"] and r["build_s"] is not None
    assert r["speedup"] == pytest.approx(r["eager_uncached_50_s"] / r["cached_50_s"])
    assert saved["peaks"]["float32"]["flops_per_s"] > 0  # the child's measured peak reaches the parent's table
    table = proc.stdout[proc.stdout.index("| backend |"):]
    assert table.count("\n| onnx |") == 2 and "float32 matmul peak" in proc.stdout  # the LoRA table's too
    lora = r["lora"]  # loaded into the built engine, as eager with it fused, unloaded to the base exactly
    assert lora["ok"] and lora["exact_unload"] and lora["weights"] > 0 and lora["load_s"] > 0
    assert max(lora["parity"].values()) <= 1e-3 < lora["change"]


def test_each_backend_runs_in_a_child_and_reports_its_row(tmp_path):
    plan = gpu_check.dataclasses.replace(gpu_check.TINY, budget_s=0.0)  # the child skips at once: no build
    row = gpu_check.Check(plan, tmp_path, log=lambda s: None, isolate=True).run_isolated("aoti")
    assert row.backend == "aoti" and row.skipped.startswith("time budget")


def test_a_child_that_crashes_is_a_row_naming_the_signal(tmp_path, monkeypatch):
    crashed = subprocess.CompletedProcess([], returncode=-11)
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda *a, **k: crashed)
    row = gpu_check.Check(gpu_check.TINY, tmp_path, log=lambda s: None, isolate=True).run_isolated("aoti")
    assert row.skipped.startswith("failed: the process died (signal SIGSEGV)")


# ------------------------------------------------------------------------------------- the full-depth row

import gpu_full_depth  # noqa: E402  (scripts/, put on the path by gpu_check)


def test_full_depth_arguments_make_the_planned_row():
    plan = gpu_check.full_depth_plan(gpu_check.parser().parse_args(["--full-depth"]))
    assert (plan.preset, plan.device, plan.steps, plan.backend, plan.fallback, plan.probe) == \
        ("flux1-dev", "cuda", 50, "aoti", "inductor", True)
    assert plan.shapes == {"height": 1024, "width": 1024, "text_len": 512} and plan.calib_samples == 1
    assert plan.compile == "regional" and plan.budget_s == 540
    tiny = gpu_check.full_depth_plan(gpu_check.parser().parse_args(
        ["--full-depth", "--tiny", "--budget-s", "100", "--compile", "full", "--backends", "inductor"]))
    assert (tiny.preset, tiny.device, tiny.budget_s, tiny.compile) == ("tiny", "cpu", 100, "full")
    assert (tiny.backend, tiny.fallback, tiny.probe) == ("inductor", None, False)  # one backend asked for: only it


def test_the_planned_phases_fit_one_ten_minute_call():
    """The H100 estimates of the default (aoti) path, with gpu_check.sh's set-up, within a 600 s call; the
    slowest phase, torch.compile, is the one a late build leaves out."""
    plan = gpu_full_depth.FULL_DEPTH
    aoti_path = sum(plan.estimate(p) for p in ("checkpoint", "build:aoti", "engine:aoti", "eager", "compile:regional"))
    assert aoti_path <= plan.budget_s - 30 and plan.budget_s <= 600 - 30  # set-up about 30 s, 30 s to spare
    assert gpu_full_depth.fits(plan, "eager", 45) is None
    assert gpu_full_depth.fits(plan, "compile:regional", 30).startswith("time budget: 30 s left")


def fake_runner(plan, out, crashes: dict, calls: list):
    """The row's child processes replaced: `crashes` maps a call ("probe", "measure:aoti", ...) to the exit code
    it ends with; a measurement writes the rows of what it was given (an engine row only when it has one)."""

    class Probe:
        def __init__(self, code):
            self.returncode = code

        def communicate(self, timeout=None):
            return ("0.05 GB of bf16 weights: built in 9 s, load+run ok" if self.returncode == 0 else "", None)

        def kill(self):
            pass

    class Fake(gpu_full_depth.Runner):
        def probe(self, timeout):
            calls.append("probe")
            return Probe(crashes.get("probe", 0))

        def checkpoint(self, folder, timeout):
            calls.append("checkpoint")
            return 0, "made"

        def build(self, weights, backend, engine, timeout, check_memory):
            calls.append(f"build:{backend}")
            return 0, "built"

        def measure(self, spec, timeout):
            s = json.loads(spec.read_text())
            key = f"measure:{s['backend'] if s['engine'] else 'none'}"
            calls.append(key)
            names = gpu_full_depth.method_names(plan, s["backend"])
            if key in crashes:  # died in the engine's load: nothing saved
                return crashes[key], "Segmentation fault"
            rows = [gpu_full_depth.MethodRow(names[0], seconds=1.5, full_steps=9, feature_parity=5e-3)
                    if s["engine"] else gpu_full_depth.MethodRow(names[0], skipped=s["engine_skipped"]),
                    gpu_full_depth.MethodRow(names[1], seconds=12.3, full_steps=50, feature_parity=0.0),
                    gpu_full_depth.MethodRow(names[2], seconds=8.2, full_steps=50, feature_parity=4e-3)]
            Path(s["result"]).write_text(json.dumps({"rows": [r.__dict__ for r in rows]}))
            return 0, ""

    return Fake(plan, out, log=lambda s: None)


def test_a_crashing_aoti_probe_builds_the_inductor_engine_instead(tmp_path):
    calls = []
    plan = gpu_full_depth.FULL_DEPTH
    rec = gpu_full_depth.run_row(plan, tmp_path, runner=fake_runner(plan, tmp_path, {"probe": -11}, calls))
    assert calls == ["probe", "checkpoint", "build:inductor", "measure:inductor"]
    assert rec["backend"] == "inductor" and rec["phases"]["aoti probe"]["status"].startswith("failed (signal SIGSEGV)")
    assert "built with inductor instead" in rec["notes"][0] and gpu_full_depth.ok(rec)


def test_an_aoti_engine_that_kills_the_measurement_falls_back_to_inductor(tmp_path):
    calls = []
    plan = gpu_full_depth.FULL_DEPTH
    rec = gpu_full_depth.run_row(plan, tmp_path, runner=fake_runner(plan, tmp_path, {"measure:aoti": -11}, calls))
    assert calls == ["probe", "checkpoint", "build:aoti", "measure:aoti", "build:inductor", "measure:inductor"]
    assert rec["rows"][0]["method"] == "SVD-Cache engine (inductor)" and rec["rows"][0]["seconds"] == 1.5
    assert any("aoti engine's measurement died (signal SIGSEGV)" in n for n in rec["notes"])


def test_without_time_for_a_fallback_the_crash_is_the_engine_rows_status(tmp_path):
    calls = []
    plan = gpu_check.dataclasses.replace(gpu_full_depth.FULL_DEPTH, fallback=None)
    rec = gpu_full_depth.run_row(plan, tmp_path, runner=fake_runner(plan, tmp_path, {"measure:aoti": -11}, calls))
    assert calls == ["probe", "checkpoint", "build:aoti", "measure:aoti", "measure:none"]  # eager, compile still run
    engine, eager = rec["rows"][0], rec["rows"][1]
    assert engine["skipped"] == "failed: the process died (signal SIGSEGV) in the aoti engine's load or run"
    assert eager["seconds"] == 12.3 and not gpu_full_depth.ok(rec)


def test_a_build_that_does_not_fit_the_budget_is_skipped_and_the_baselines_still_run(tmp_path):
    calls = []
    plan = gpu_check.dataclasses.replace(gpu_full_depth.FULL_DEPTH, budget_s=200.0)
    rec = gpu_full_depth.run_row(plan, tmp_path, runner=fake_runner(plan, tmp_path, {}, calls))
    assert calls == ["probe", "checkpoint", "measure:none"]
    assert rec["phases"]["build aoti"]["status"].startswith("skipped: time budget")
    assert rec["rows"][0]["skipped"].startswith("time budget") and rec["rows"][1]["seconds"] == 12.3


def test_the_full_depth_table_has_ratios_against_eager_and_compile():
    rows = [gpu_full_depth.MethodRow("SVD-Cache engine (aoti)", seconds=1.5, full_steps=9, prepare_s=35,
                                     peak_allocated_gib=25.04, peak_reserved_gib=26.0, feature_parity=5e-3,
                                     output_parity=3e-2, device_used_gib=25.3,
                                     latents_vs_eager=0.05),
            gpu_full_depth.MethodRow("eager bf16", seconds=12.3, full_steps=50, feature_parity=0.0),
            gpu_full_depth.MethodRow("torch.compile (regional)", skipped="time budget: 20 s left")]
    rec = {"plan": gpu_check.dataclasses.asdict(gpu_full_depth.FULL_DEPTH), "notes": ["a note"],
           "phases": {"checkpoint": {"seconds": 41.2, "status": "ok"}}, "rows": [r.__dict__ for r in rows]}
    lines = gpu_full_depth.table(rec, "NVIDIA H100 80GB HBM3").splitlines()
    assert "on NVIDIA H100 80GB HBM3" in lines[0] and "checkpoint 41 s (ok)" in lines[0]
    header, engine, eager, compiled = lines[2], lines[4], lines[5], lines[6]
    assert header.count("|") == engine.count("|") == eager.count("|") == compiled.count("|") == 11
    assert engine == ("| SVD-Cache engine (aoti) | 1.50 | 8.20x | - | 9/50 | 35 | 25.0 | 26.0 (25.3) "
                      "| 5.0e-03 (ok) (3.0e-02) | 5.0e-02 |")
    assert eager.startswith("| eager bf16 | 12.30 | 1.00x |") and "skipped: time budget" in compiled
    assert lines[-1] == "note: a note" and not gpu_full_depth.ok(rec)  # a skipped method: not a complete row
    rec["rows"][2] = gpu_full_depth.MethodRow("torch.compile (regional)").__dict__  # the child died before it
    assert "skipped: not measured: the measurement ended before it |" in gpu_full_depth.table(rec, "GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_full_depth_without_a_gpu_is_one_line(capsys):
    assert gpu_check.main(["--full-depth", "--out", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("svdexport: error: no CUDA GPU is visible")


@pytest.mark.slow
@pytest.mark.extended
def test_full_depth_tiny_runs_the_whole_row_on_this_cpu(tmp_path):
    """The row end to end with the tiny preset on this CPU: checkpoint, `svdexport build --backend aoti`, and in
    one child the engine, eager and torch.compile (regional) on the same inputs; ratios from that run."""
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--full-depth", "--tiny",
                           "--out", str(tmp_path / "e"), "--json", str(tmp_path / "row.json")],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads((tmp_path / "row.json").read_text())
    engine, eager, compiled = rec["rows"]
    assert rec["backend"] == "aoti" and rec["build"]["ok"] and not any(r["skipped"] for r in rec["rows"])
    assert engine["full_steps"] < 50 == eager["full_steps"] == compiled["full_steps"]
    assert engine["feature_parity"] <= 2e-2 and compiled["feature_parity"] <= 2e-2 and eager["feature_parity"] == 0.0
    assert engine["output_parity"] < 0.1 and compiled["output_parity"] < 2e-2  # the output: eager's head rounds
    assert 0 < engine["latents_vs_eager"] < 1 and compiled["latents_vs_eager"] < 2e-2
    table = proc.stdout[proc.stdout.index("| method |"):]
    assert f"| {engine['seconds']:.2f} | {eager['seconds'] / engine['seconds']:.2f}x |" in table


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the checkpoint drawn on it, the "
                    "AOTInductor probe and the aoti engine's CUDA load")
def test_full_depth_tiny_on_the_gpu(tmp_path):
    plan = gpu_check.dataclasses.replace(gpu_full_depth.TINY_FULL_DEPTH, device="cuda", probe=True)
    rec = gpu_full_depth.run_row(plan, tmp_path)
    assert rec["phases"]["checkpoint"]["status"] == "ok" and "aoti probe" in rec["phases"]
    assert all(not r["skipped"] for r in rec["rows"]), rec


def test_a_quantized_row_is_its_backend_with_a_scheme_and_refused_where_it_cannot_build():
    assert gpu_check.row_engine("aoti") == ("aoti", "none")
    assert gpu_check.row_engine("aoti+fp8") == ("aoti", "fp8")
    assert "aoti+fp8" in gpu_check.GPU.backends and gpu_check.GPU.backends[:4] == ("aoti", "inductor", "tensorrt", "onnx")
    if not torch.cuda.is_available():
        assert "fp8" in gpu_check.unavailable("aoti+fp8", "cpu")  # the build's own one-line refusal
    assert "aoti" in gpu_check.unavailable("onnx+int8", "cpu")  # only aoti ships quantized engines
