"""Shape ranges (issue 15): options checked before the work, the range in the manifest, requests in and out
of range, the sampler's shift per request. Ranged engines of the compiled backends: test_backends.py."""

import dataclasses

import pytest
import torch

from helpers import FAST, TINY_SHAPES, assert_one_line_error, cached_sampler, plain_diffusers_loop, quick_engine
from helpers import run_cli, tiny_model
import svdexport
from svdexport.cli import main
from svdexport.errors import SvdExportError
from svdexport.models.flux import FLUX, FluxShapes
from svdexport.runtime import manifest as mf

RANGE = ["--min-height", "96", "--max-height", "160", "--min-width", "96", "--max-width", "160", "--max-batch", "2"]


@pytest.fixture(scope="module")
def ranged(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranged") / "engine"
    assert main(["build", "--out", str(out), *FAST, "--calib-steps", "1", *RANGE, "--calib-samples", "2",
                 "--calib-shapes", "96x160"]) == 0
    return out


@pytest.mark.parametrize("args, words", [
    (["--max-height", "112"], ["--max-height 112 is below --height 128"]),
    (["--min-width", "144"], ["--min-width 144 is above --width 128"]),
    (["--max-height", "150"], ["--max-height 150", "multiple of 16"]),
    (["--max-batch", "0"], ["--max-batch 0 is below --batch 1"]),
    (["--max-text-len", "16"], ["class table", "--max-text-len"]),
    (["--calib-shapes", "96x96"], ["height 96", "static engine"]),
    ([*RANGE, "--calib-shapes", "96by96"], ["--calib-shapes must be a comma list of HEIGHTxWIDTH"]),
    ([*RANGE, "--calib-shapes", "192x96"], ["height 192", "96..160"]),
])
def test_bad_range_options_are_one_line_before_the_work(tmp_path, capsys, args, words):
    code, _, err = run_cli(capsys, "build", "--out", tmp_path / "e", *FAST, *args)
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "e").exists()


def test_manifest_records_the_range_and_old_engines_load_static(ranged):
    m = mf.read(ranged)
    assert m.shapes.kind is mf.EngineKind.RANGED
    assert (m.shapes.min["height"], m.shapes.max["height"], m.shapes.min["batch"], m.shapes.max["batch"]) == (96, 160, 1, 2)
    assert m.calibration.shapes == [[96, 160]]
    old = mf._parse(mf.ShapesRecord, {"build": m.shapes.build, "inputs": m.shapes.inputs}, "shapes")
    assert old.kind is mf.EngineKind.STATIC and not old.range(FLUX).ranged
    with pytest.raises(SvdExportError, match="unknown value 'elastic'"):
        mf._parse(mf.ShapesRecord, {"build": {}, "inputs": {}, "kind": "elastic"}, "shapes")
    with pytest.raises(SvdExportError, match="shapes.min and shapes.max"):
        dataclasses.replace(old, kind=mf.EngineKind.RANGED).range(FLUX)


def test_run_takes_shapes_in_range_and_refuses_others_in_one_line(ranged, tmp_path, capsys):
    code, out, err = run_cli(capsys, "run", ranged, "--steps", "3", "--height", "96", "--width", "160", "--batch", "2",
                             "--out", tmp_path / "a.png")
    assert code == 0, err
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "a.safetensors"))["latents"].shape[:2] == (2, 6 * 10)
    for args, words in ((["--height", "176"], ["height 176", "96..160"]), (["--batch", "3"], ["batch 3", "1..2"]),
                        (["--width", "100"], ["width=100", "multiple of 16"])):
        code, _, err = run_cli(capsys, "run", ranged, "--steps", "2", *args, "--out", tmp_path / "b.png")
        assert_one_line_error(code, err, *words)
        assert not (tmp_path / "b.png").exists()


def test_static_engine_refuses_another_shape_naming_its_own(tmp_path_factory, tmp_path, capsys):
    engine = quick_engine(tmp_path_factory, "static")
    capsys.readouterr()
    code, _, err = run_cli(capsys, "run", engine, "--height", "96", "--out", tmp_path / "b.png")
    assert_one_line_error(code, err, "static engine", "height 128 only", "--max-height")


def test_generate_checks_given_inputs_against_the_request(ranged):
    engine = svdexport.load(ranged)
    shapes = engine.request_shapes(batch=2, height=96, width=112)
    inputs = engine.example_inputs(1, shapes=shapes)
    assert engine.generate(inputs, steps=2, height=96, width=112).latents.shape == (2, 42, 4)
    with pytest.raises(SvdExportError, match=r"input 'hidden_states' has shape \(2, 42, 4\); at .* it must be"):
        engine.generate(inputs, steps=2)  # the inputs are 96x112, the request the build's 128x128
    inputs["hidden_states"] = torch.zeros(2, 300, 4)
    with pytest.raises(SvdExportError, match=r"this ranged engine takes \(1, 36, 4\) to \(2, 100, 4\)"):
        engine.check_inputs(inputs)  # a pipeline's call: every dimension within the range


def test_sampler_shift_follows_each_requests_resolution():
    model = tiny_model()
    sampler = cached_sampler(model, "final", TINY_SHAPES, interval=1)  # every step full: the plain loop's result
    for shapes in (FluxShapes(batch=2, height=96, width=160, text_len=8), FluxShapes(height=256, width=128, text_len=8)):
        inputs = FLUX.example_inputs(dict(model.config), shapes, seed=2)
        got = sampler.generate(inputs, steps=4, shapes=shapes).latents
        want = plain_diffusers_loop(model, inputs, 4, shapes)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_dynamic_dimensions_and_tensorrt_profiles_come_from_the_range_ends():
    from svdexport.export import GraphExport
    from svdexport.export.tensorrt import profiles

    z = torch.zeros
    g = GraphExport(torch.nn.Identity(), (z(2, 64, 4), z(6, 8)), ["x", "b"], ["y"],
                    min_args=(z(1, 36, 4), z(6, 8)), max_args=(z(2, 100, 4), z(6, 8)))
    (x, b) = g.dynamic_shapes()
    assert b is None and sorted(x) == [0, 1]
    assert (x[0].min, x[0].max, x[1].min, x[1].max) == (1, 3, 36, 100)  # batch: torch.export needs room above 2
    assert profiles(g) == [((1, 36, 4), (2, 64, 4), (2, 100, 4)), ((6, 8), (6, 8), (6, 8))]


def test_bench_of_shapes_runs_and_checks_its_options_first(ranged, tmp_path_factory, tmp_path, capsys):
    static = quick_engine(tmp_path_factory, "static-bench")
    quick = ["--steps", "2", "--repeats", "1", "--step-calls", "1", "--e2e-repeats", "1"]
    capsys.readouterr()
    for args, words in (([static, "--resolutions", "96x96"], ["static engine", "ranged one"]),
                        ([ranged, "--resolutions", "96"], ["--resolutions must be"]),
                        ([ranged, "--resolutions", "96x192"], ["width 192", "96..160"])):
        code, _, err = run_cli(capsys, "bench", "shapes", *args, *quick)
        assert_one_line_error(code, err, *words)
    assert_one_line_error(*run_cli(capsys, "bench", "shapes", ranged, *quick)[::2], "--against", "--resolutions")
    code, out, err = run_cli(capsys, "bench", "shapes", ranged, "--against", static, "--resolutions",
                             "96x96,160x112", *quick, "--json", tmp_path / "r.json")
    assert code == 0, err
    assert "ranged / static" in out and "| 160x112 | 70 |" in out
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["against"]["ratios"]) == {"full_step_ranged_vs_static", "cached_step_ranged_vs_static",
                                                "e2e_ranged_vs_static"}
