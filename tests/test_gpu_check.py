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
