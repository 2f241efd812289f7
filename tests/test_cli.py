"""The command line: build and run end to end, and one-line errors on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from helpers import FAST, assert_one_line_error, plain_diffusers_loop, run_cli, tiny_model
from svdexport.cli import main



@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("eng") / "flux"
    assert main(["build", "--out", str(out), *FAST]) == 0
    return out


@pytest.fixture
def tiny_folder(tmp_path):
    """A local diffusers folder with a transformer/ subfolder, as a FLUX.1 download has."""
    model = tiny_model(guidance=True)
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    return tmp_path / "pipe", model


def test_build_writes_manifest_and_bases(engine):
    m = json.loads((engine / "manifest.json").read_text())
    assert m["model"]["family"] == "flux" and m["backend"] == "eager"
    assert m["model"]["weights"]["source"] == "bundled:digits" and len(m["model"]["weights"]["sha256"]) == 64
    assert m["model"]["conditioning"] == {"kind": "class-table", "file": "conditioning.safetensors",
                                          "labels": [str(i) for i in range(10)]}
    assert [s["name"] for s in m["sites"]] == ["final"]
    assert m["calibration"] == {"num_inputs": 1, "num_timesteps": 4, "tau": 0.95, "k_max": 64}
    assert m["shapes"]["inputs"]["hidden_states"] == [1, 64, 4]
    assert set(m["files"]) == {"bases.safetensors", "conditioning.safetensors", "plan_stats.safetensors"}
    assert {"torch", "diffusers", "svdexport"} <= set(m["versions"])
    assert m["graphs"]["cached"]["parameters"] < m["graphs"]["full"]["parameters"]
    assert not list(engine.parent.glob(".*tmp*"))  # the temporary build folder is gone


def test_run_writes_image_latents_and_reports_steps(engine, tmp_path, capsys):
    png = tmp_path / "img.png"
    code, out, _ = run_cli(capsys, "run", engine, "--steps", 20, "--seed", 3, "--out", png)
    assert code == 0
    assert Image.open(png).size == (256, 256)  # 16x16 pixels of the digits model, scaled x16
    latents = load_file(str(png.with_suffix(".safetensors")))["latents"]
    assert latents.shape == (1, 64, 4) and torch.isfinite(latents).all()
    # The engine's plan is calibrated for 4 steps: 20 steps get it rescaled, with the uniform plan's 5 full
    # steps (warmup 3, interval 7), and the plan is printed; the fitted weights exist for 4 steps only, so
    # the stated rule runs svd-taylor's plan and weights at 20.
    assert ("full steps (calibrated for 4 steps, rescaled to 20; svd-fitted is fitted for 4 steps: svd-taylor's "
            "plan and weights at 20 (build with --plan-steps 20 to fit it there)): ") in out and "20 steps: 5 full, 15 cached" in out


def test_build_from_local_folder_matches_plain_loop_at_interval_one(tiny_folder, tmp_path, capsys):
    import svdexport

    folder, model = tiny_folder
    out = tmp_path / "eng"
    code, _, err = run_cli(capsys, "build", "--weights", folder, "--out", out, "--k-max", 16, *FAST)
    assert code == 0, err
    engine = svdexport.load(out)
    assert engine.manifest.model.weights.source == str(folder.resolve())
    inputs = engine.example_inputs(seed=5)
    assert "guidance" in inputs
    got = engine.generate(inputs, steps=8, interval=1).latents
    expected = plain_diffusers_loop(model, inputs, 8, engine.shapes)
    assert (got - expected).abs().max() <= 1e-5


def test_single_safetensors_file_with_inferred_config(tmp_path, capsys):
    # Head dim 128 lets svdexport infer FLUX's rotary axes without a config.json.
    torch.manual_seed(0)
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                                   num_attention_heads=1, joint_attention_dim=32, pooled_projection_dim=16)
    save_file(model.state_dict(), str(tmp_path / "t.safetensors"))
    code, out, err = run_cli(capsys, "build", "--weights", tmp_path / "t.safetensors", "--out", tmp_path / "e", *FAST)
    assert code == 0, err
    m = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert m["model"]["config"]["num_layers"] == 1 and m["model"]["config"]["axes_dims_rope"] == [16, 56, 56]


@pytest.mark.parametrize("argv,words", [
    (["--model", "sd9"], ["unknown model", "sd9"]),
    (["--tau", "0"], ["tau"]),
    (["--tau", "1.2"], ["tau"]),
    (["--interval", "0"], ["interval"]),
    (["--warmup", "-1"], ["warmup"]),
    (["--k-max", "129"], ["k_max", "hidden size 128"]),
    (["--predictor", "magic"], ["predictor"]),
    (["--height", "100"], ["height"]),
    (["--weights", "/nonexistent/flux"], ["not found"]),
    (["--weights", "bundled:nope"], ["unknown bundled model"]),
    (["--text-len", "9"], ["class table has 8 text tokens"]),
    (["--backend", "nope"], ["backend"]),
])
def test_build_bad_input_one_line_and_nothing_written(tmp_path, capsys, argv, words):
    out = tmp_path / "never"
    code, _, err = run_cli(capsys, "build", "--out", out, *FAST, *argv)
    assert_one_line_error(code, err, *words)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_weights_folders(tmp_path, capsys, tiny_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "build", "--weights", empty, "--out", tmp_path / "o", *FAST)
    assert_one_line_error(code, err, "no transformer")

    folder, _ = tiny_folder
    cfg = folder / "transformer" / "config.json"
    original = cfg.read_text()
    cfg.write_text("{not json")
    code, _, err = run_cli(capsys, "build", "--weights", folder, "--out", tmp_path / "o", *FAST)
    assert_one_line_error(code, err, "malformed")

    cfg.write_text(json.dumps({**json.loads(original), "_class_name": "SD3Transformer2DModel"}))
    code, _, err = run_cli(capsys, "build", "--weights", folder, "--out", tmp_path / "o", *FAST)
    assert_one_line_error(code, err, "SD3Transformer2DModel")

    cfg.write_text(json.dumps({**json.loads(original), "num_layers": 5}))  # config and weights disagree
    code, _, err = run_cli(capsys, "build", "--weights", folder, "--out", tmp_path / "o", *FAST)
    assert_one_line_error(code, err, "cannot load")

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    code, _, err = run_cli(capsys, "build", "--weights", junk, "--out", tmp_path / "o", *FAST)
    assert_one_line_error(code, err, "cannot read")

    other = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(3, 3)}, str(other))
    code, _, err = run_cli(capsys, "build", "--weights", other, "--out", tmp_path / "o", *FAST)
    assert_one_line_error(code, err, "not a FLUX transformer")
    assert not (tmp_path / "o").exists()


def copy_engine(engine, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(engine, dst)
    return dst


def test_run_refuses_missing_edited_or_corrupted_engines(engine, tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", tmp_path / "nothing")
    assert_one_line_error(code, err, "not found")

    eng = copy_engine(engine, tmp_path)
    m = json.loads((eng / "manifest.json").read_text())
    m["cache"]["interval"] = 2
    (eng / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(capsys, "run", eng)
    assert_one_line_error(code, err, "edited")

    (eng / "manifest.json").unlink()
    code, _, err = run_cli(capsys, "run", eng)
    assert_one_line_error(code, err, "manifest.json is missing")

    eng2 = copy_engine(engine, tmp_path / "b")
    data = bytearray((eng2 / "bases.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (eng2 / "bases.safetensors").write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "run", eng2)
    assert_one_line_error(code, err, "corrupted")


def test_run_refuses_other_library_versions(engine, tmp_path, capsys):
    from svdexport.runtime import manifest

    eng = copy_engine(engine, tmp_path)
    m = json.loads((eng / "manifest.json").read_text())
    m["versions"]["torch"] = "1.0.0"
    m["manifest_sha256"] = manifest._digest(m)  # consistent manifest, other versions
    (eng / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(capsys, "run", eng)
    assert_one_line_error(code, err, "torch 1.0.0")


@pytest.mark.parametrize("edit,words", [
    (lambda m: m["model"].pop("family"), "model.family is missing"),
    (lambda m: m["model"]["conditioning"].update(kind="telepathy"), "conditioning.kind has unknown value"),
    (lambda m: m.update(steps="fifty"), "steps must be int"),
    (lambda m: m["graphs"]["full"].pop("inputs"), "graphs.full.inputs is missing"),
])
def test_run_refuses_a_consistent_manifest_of_the_wrong_form(engine, tmp_path, capsys, edit, words):
    # The digest is recomputed, so only the typed read can catch these: one line naming the field.
    from svdexport.runtime import manifest

    eng = copy_engine(engine, tmp_path)
    m = json.loads((eng / "manifest.json").read_text())
    edit(m)
    m["manifest_sha256"] = manifest._digest(m)
    (eng / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(capsys, "run", eng)
    assert_one_line_error(code, err, words)


def test_manifest_round_trips_through_the_typed_form(engine):
    from svdexport.runtime import manifest

    m = manifest.read(engine)
    assert m.model.conditioning.kind is manifest.ConditioningKind.CLASS_TABLE
    assert m.cache.interval == 7 and m.graphs["full"].inputs[0] == "hidden_states"
    assert m.to_dict() == json.loads((engine / "manifest.json").read_text())  # nothing lost or added


def test_wrong_input_shape_names_the_built_shape(engine):
    import svdexport
    from svdexport.errors import SvdExportError

    e = svdexport.load(engine)
    inputs = e.example_inputs()
    inputs["hidden_states"] = torch.zeros(1, 100, 4)
    with pytest.raises(SvdExportError, match=r"built for \(1, 64, 4\)"):
        e.generate(inputs, steps=2)


def test_labels_choose_the_class_and_are_validated(engine, tmp_path, capsys):
    import svdexport
    from svdexport.errors import SvdExportError

    e = svdexport.load(engine)
    a, b = e.example_inputs(0, labels=[3]), e.example_inputs(0, labels=[7])
    assert torch.equal(a["hidden_states"], b["hidden_states"])  # same noise, other class
    assert not torch.equal(a["pooled_projections"], b["pooled_projections"])
    with pytest.raises(SvdExportError, match="class indices"):
        e.example_inputs(0, labels=[10])
    code, _, err = run_cli(capsys, "run", engine, "--label", 12, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "class indices")


def test_bundled_random_model_with_synthetic_conditioning(tmp_path, capsys):
    out = tmp_path / "r"
    code, _, err = run_cli(capsys, "build", "--weights", "bundled:random", "--out", out, *FAST)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["conditioning"] == {"kind": "synthetic"} and m["shapes"]["inputs"]["hidden_states"] == [1, 64, 64]
    code, _, err = run_cli(capsys, "run", out, "--label", 1, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "not class-conditioned")


def test_bad_run_arguments(engine, tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", engine, "--steps", 0)
    assert_one_line_error(code, err, "steps")
    code, _, err = run_cli(capsys, "run", engine, "--out", tmp_path / "x.jpg")
    assert_one_line_error(code, err, ".png")
    code, _, err = run_cli(capsys, "run", engine, "--interval", 0, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "interval")
    assert not (tmp_path / "x.png").exists()


def test_calibrate_command(tmp_path, capsys):
    from svdexport.cache.svd import Bases

    code, out, err = run_cli(capsys, "calibrate", "--out", tmp_path / "b.safetensors", "--granularity", "final", *FAST)
    assert code == 0, err
    bases = Bases.load(tmp_path / "b.safetensors")
    assert bases.sites == ["final"] and bases.num_timesteps == 4
    assert [p.name for p in tmp_path.iterdir()] == ["b.safetensors"]


def test_console_script_exits_nonzero_without_traceback(tmp_path):
    exe = Path(sys.executable).with_name("svdexport")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "svdexport.cli"]
    proc = subprocess.run([*cmd, "run", str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("svdexport: error:")


def test_existing_foreign_folder_is_not_replaced(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "build", "--out", out, *FAST)
    assert_one_line_error(code, err, "not an svdexport output")
    assert (out / "notes.txt").read_text() == "keep me"


def test_failed_rebuild_keeps_the_previous_engine(engine, tmp_path, capsys, monkeypatch):
    eng = copy_engine(engine, tmp_path)
    before = (eng / "manifest.json").read_text()
    from svdexport.builder import build as build_mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(build_mod.mf, "write", boom)
    with pytest.raises(RuntimeError):
        main(["build", "--out", str(eng), "--interval", "5", *FAST])  # other settings: a real rebuild
    assert (eng / "manifest.json").read_text() == before
    assert [p.name for p in eng.parent.iterdir()] == ["copy"]


def test_calibrated_plan_is_stored_searched_and_shown(engine, tmp_path, capsys):
    import svdexport
    from svdexport.cache import fitted as fit
    from svdexport.cache.plan import StepPlan, search_table

    e = svdexport.load(engine)  # built with 4 calibration steps: its plan is for 4 steps
    record = e.manifest.plans[0]  # the build's budget first, then the other refined budgets
    assert record.steps == 4 and record.full_steps[0] == 0
    assert len(record.full_steps) == len(StepPlan.uniform(4, 3, 7).full_steps)
    assert len(e.manifest.plans) == 1 and not record.refined and record.score is None  # refinement is opt-in
    assert e.plan(4).full_steps == record.full_steps and e.plan(4).source == "calibrated"
    # Another budget at the calibrated step count: searched at run time from the stored statistics.
    two = e.plan(4, e.cache_config(full_steps=2))
    # (the DP on the engine's own forecast, svd-fitted: Taylor's gamma-0 plan only happened to coincide)
    assert two.full_steps == search_table(fit.errors(e.plan_stats), 2, e.step_sizes(4)).full_steps
    # Another step count: the stated rule (rescaled), and every request plan starts with a full step.
    other = e.plan(20)
    assert other.source.startswith("calibrated for 4 steps") and other.full_steps[0] == 0
    assert e.generate(seed=1, steps=20).full_steps == len(other.full_steps)
    # warmup / interval at run time mean the uniform plan they describe.
    assert e.plan(20, e.cache_config(interval=5)).full_steps == StepPlan.uniform(20, 3, 5).full_steps
    code, out, _ = run_cli(capsys, "run", engine, "--steps", 4, "--out", tmp_path / "p.png")
    assert code == 0 and f"full steps (calibrated): {' '.join(map(str, record.full_steps))}" in out


def test_plan_steps_fit_the_forecast_at_other_step_counts(tmp_path, capsys):
    import svdexport
    from svdexport.cache import fitted as fit

    code, out, err = run_cli(capsys, "build", "--out", tmp_path / "p", *FAST, "--plan-steps", "6,4,6")
    assert code == 0, err
    e = svdexport.load(tmp_path / "p")
    assert e.manifest.calibration.plan_steps == [6]  # the build's own count (4) and repeats dropped
    assert e.plan_stats.steps == 4 and e.stats_for(6).steps == 6 and e.stats_for(20) is e.plan_stats
    assert e.stats_for(6).trajectories == e.plan_stats.trajectories == 1
    assert [r.steps for r in e.manifest.plans] == [4, 6]
    assert "calibrated plan of 6 steps: full steps" in out
    # A request of 6 steps: the recorded plan and weights fitted on the 6-step trajectories, not Taylor's.
    plan = e.plan(6)
    assert plan.source == "calibrated" and plan.full_steps == e.manifest.plans[1].full_steps
    expected = fit.forecast_weights(e.stats_for(6), plan.full_steps, 6)
    assert set(plan.forecast_weights) == set(expected)
    assert all(np.array_equal(x, y) for i in expected for x, y in zip(plan.forecast_weights[i], expected[i]))
    assert e.generate(seed=0, steps=6).full_steps == len(plan.full_steps)
    # Other step counts keep the stated rule, and say how to fit them.
    assert "build with --plan-steps 20 to fit it there" in e.plan(20).source
    for bad in (["1"], ["x"], ["6,,8"], ["6", "--plan", "uniform", "--predictor", "svd-taylor"]):
        code, _, err = run_cli(capsys, "build", "--out", tmp_path / "bad", *FAST, "--plan-steps", *bad)
        assert code != 0 and "--plan-steps" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "bad").exists()


@pytest.mark.extended
def test_refined_plans_are_stored_and_used(tmp_path, capsys):
    import svdexport
    from svdexport.builder.step_plans import refine_budgets

    code, out, err = run_cli(capsys, "build", "--out", tmp_path / "r", *FAST[:2], "--calib-steps", "8",
                             *FAST[4:], "--full-steps", "4", "--refine-evaluations", "30", "--refine-samples", "2")
    assert code == 0, err
    e = svdexport.load(tmp_path / "r")
    # The build's budget first, then b - 2 and b + 3 (2 and 7 full steps of 8), each refined and scored.
    assert [len(r.full_steps) for r in e.manifest.plans] == [4, 2, 7]
    assert all(r.refined and r.score is not None and r.full_steps[0] == 0 for r in e.manifest.plans)
    for r in e.manifest.plans:  # the engine runs the refined plan of each recorded budget
        assert e.plan(8, e.cache_config(full_steps=len(r.full_steps))).full_steps == r.full_steps
    assert "refined: " in out
    assert refine_budgets(9, 50, None) == [7, 9, 12] and refine_budgets(9, 50, [12, 1, 50]) == [9, 12]
    assert refine_budgets(3, 4, None) == [3]  # 1 and 6 full steps of 4 leave nothing to choose


def test_uniform_build_stores_no_plan(tmp_path, capsys):
    import svdexport

    code, out, err = run_cli(capsys, "build", "--out", tmp_path / "u", "--plan", "uniform", "--predictor",
                             "svd-taylor", *FAST)
    assert code == 0, err
    e = svdexport.load(tmp_path / "u")
    assert e.manifest.plans == [] and e.plan_stats is None and e.plan(50).source == "uniform"
    assert e.generate(seed=0, steps=12).full_steps == 3 + 1  # warmup 0-2, then step 8
    # The fitted predictor (the default) keeps the statistics its weights come from, and no plan.
    code, out, err = run_cli(capsys, "build", "--out", tmp_path / "f", "--plan", "uniform", *FAST)
    assert code == 0, err
    e = svdexport.load(tmp_path / "f")
    assert e.manifest.plans == [] and e.plan_stats is not None
    plan = e.plan(4)
    assert plan.source == "uniform" and set(plan.forecast_weights) == set(range(4)) - set(plan.full_steps)
    code, _, err = run_cli(capsys, "build", "--out", tmp_path / "v", "--plan", "best", *FAST)
    assert_one_line_error(code, err, "unknown plan 'best'")
