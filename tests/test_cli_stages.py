"""The command line cut by pipeline stage (issue 26): imports that wait for the command, option groups owned by
the stage that uses them, the predictor's parameters given with it, `build --bases` taking a `calibrate` file
back in, bench's subcommands, and a line with the elapsed time for every long phase."""

import argparse
import dataclasses
import json
import os
import pty
import re
import subprocess
import sys

import pytest
import torch

from helpers import FAST, TINY_SHAPES, assert_one_line_error, cached_sampler, run_cli, tiny_model
from svdexport.cli import parser
from svdexport.cli.family_help import family_help, option, shape_axes
from svdexport.cli.options import parse_predictor

HEAVY = ("torch", "diffusers", "transformers", "numpy")


def heavy_imports(*argv: str) -> list[str]:
    """The heavy libraries a fresh interpreter has imported after `svdexport ARGV` (help or work)."""
    code = (f"import sys\nfrom svdexport.cli import main\nassert main({list(argv)!r}) == 0\n"
            f"print('heavy:', *sorted(set({HEAVY!r}) & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1].split()[1:]


def options_of(p: argparse.ArgumentParser) -> set[str]:
    """The options a subcommand's --help lists (hidden ones, which only answer with a hint, left out)."""
    return {s for a in p._actions if a.help != argparse.SUPPRESS for s in a.option_strings}


def subparser(*names: str) -> argparse.ArgumentParser:
    p = parser()
    for name in names:
        p = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return p


# ------------------------------------------------------------------------------------------------ lazy imports


def test_help_keygen_and_sign_import_no_model_library(tmp_path, bases_and_engine):
    _, engine = bases_and_engine
    assert heavy_imports("--help") == []
    assert heavy_imports("keygen", "--help") == []
    assert heavy_imports("keygen", "--out", str(tmp_path / "key")) == []
    assert heavy_imports("sign", str(engine), "--key", str(tmp_path / "key")) == []
    assert (engine / "signature.json").is_file()
    (engine / "signature.json").unlink()  # the other tests use the engine unsigned


# ------------------------------------------------------------------------------------------------ option groups


def test_calibrate_offers_only_what_changes_the_bases(tmp_path, capsys):
    axes = {option(a) for a in family_help().axes}
    assert options_of(subparser("calibrate")) == {
        "-h", "--help", "--model", "--weights", "--dtype", "--device", *axes, "--granularity", "--tau", "--k-max",
        "--calib-samples", "--calib-steps", "--calib-shapes", "--calibration-prompts", "--out", "--verbose", "--force"}
    # A build option given to calibrate: one line saying where it belongs, before any work.
    for flag in ("--interval", "--predictor", "--backend", "--order"):
        code, _, err = run_cli(capsys, "calibrate", "--out", tmp_path / "never.safetensors", flag, "3")
        assert_one_line_error(code, err, flag, "build option", "build --bases")
    assert list(tmp_path.iterdir()) == []


def test_build_offers_every_shape_axis_a_family_declares():
    """The build shapes are the families' `shapes_type` fields, with the help text each declares."""
    from svdexport.models import FAMILIES

    build = {a.dest: a for a in subparser("build")._actions}
    for fam in FAMILIES.values():
        for axis, text in shape_axes(fam.shapes_type).items():
            assert build[axis].option_strings == [option(axis)] and text in build[axis].help
    assert "frames" in build and "hunyuanvideo only" in build["frames"].help


# ------------------------------------------------------------------------------------------------ predictor


def test_predictor_parameters_travel_with_the_predictor(tmp_path, capsys):
    assert parse_predictor("svd-taylor:order=2") == {"predictor": "svd-taylor", "order": 2}
    assert parse_predictor("ema:beta=0.5,gamma=0") == {"predictor": "ema", "beta": 0.5, "gamma": 0.0}
    assert parse_predictor("svd-fitted") == {"predictor": "svd-fitted"}
    for text, words in (("svd-fitted:gamma=1", ["svd-fitted takes no parameters"]),
                        ("svd-taylor:beta=0.5", ["svd-taylor takes order, gamma", "'beta=0.5'"]),
                        ("svd-taylor:order=3", ["order must be 1 or 2"]), ("ema:beta=x", ["beta must be a number"]),
                        ("ema:beta=0.1,beta=0.2", ["twice"]), ("ema:beta", ["takes beta, gamma"]),
                        ("magic", ["unknown predictor 'magic'"])):
        code, _, err = run_cli(capsys, "build", "--out", tmp_path / "never", *FAST, "--predictor", text)
        assert_one_line_error(code, err, "--predictor", *words)
    for flag, example in (("--beta", "ema:beta=0.9"), ("--order", "svd-taylor:order=2"), ("--gamma", "gamma=0")):
        code, _, err = run_cli(capsys, "build", "--out", tmp_path / "never", *FAST, flag, "1")
        assert_one_line_error(code, err, flag, "is gone", example)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("name", ["svd-taylor", "ema-velocity", "ema", "reuse"])
def test_a_predictor_takes_exactly_the_parameters_that_change_its_forecast(name):
    """PARAMETERS (what --predictor NAME:KEY=VALUE accepts) against what the forecast reads: a declared
    parameter changes the latents, any other leaves them bit for bit."""
    from svdexport.cache.config import CacheConfig
    from svdexport.cache.predictors import PARAMETERS, PREDICTORS
    from svdexport.models.flux import FLUX

    assert set(PARAMETERS) == set(PREDICTORS)
    model = tiny_model()
    loop = cached_sampler(model, "final", TINY_SHAPES, predictor=name, warmup=3, interval=3)
    inputs = FLUX.example_inputs(dict(model.config), TINY_SHAPES, seed=3)
    base = CacheConfig(granularity="final", predictor=name, warmup=3, interval=3)
    reference = loop.generate(inputs, 12, cache=base).latents
    for key, other in (("beta", 0.5), ("order", 2), ("gamma", 0.0)):
        got = loop.generate(inputs, 12, cache=dataclasses.replace(base, **{key: other})).latents
        assert (not torch.equal(got, reference)) == (key in PARAMETERS[name]), key


# ------------------------------------------------------------------------------------------------ build --bases


@pytest.fixture(scope="module")
def bases_and_engine(tmp_path_factory):
    """A `calibrate` file and an engine built the usual way (calibrating) with the same settings."""
    from svdexport.cli import main

    root = tmp_path_factory.mktemp("bases")
    assert main(["calibrate", "--out", str(root / "b.safetensors"), *FAST]) == 0
    assert main(["build", "--out", str(root / "plain"), *FAST]) == 0
    return root / "b.safetensors", root / "plain"


def test_build_takes_the_bases_of_calibrate_and_announces_its_phases(bases_and_engine, tmp_path, capsys):
    bases, plain = bases_and_engine
    out = tmp_path / "e"
    code, stdout, err = run_cli(capsys, "build", "--bases", bases, "--backend", "inductor", "--out", out,
                                "--graphs", tmp_path / "g", *FAST)
    assert code == 0, err
    assert "calibrating" not in err and f"from {bases}" in stdout  # no calibration: the file's bases
    # The same bases as the build that calibrated them (the file's origin is not copied into the engine).
    assert (out / "bases.safetensors").read_bytes() == (plain / "bases.safetensors").read_bytes()
    ours, theirs = (json.loads((p / "manifest.json").read_text()) for p in (out, plain))
    assert ours["calibration"] == theirs["calibration"] and ours["sites"] == theirs["sites"]
    assert ours["build_key"] != theirs["build_key"]
    lines = err.splitlines()  # the torch.export of each graph, one line each with its elapsed time
    for graph in ("full", "cached"):
        assert any(line.startswith(f"exporting the {graph} graph (torch.export) ... ") and line.endswith(" s")
                   for line in lines), err


@pytest.mark.parametrize("argv,words", [
    (["--k-max", "32"], ["k_max 64", "the build 32"]),
    (["--granularity", "block"], ["granularity final", "the build block"]),
    (["--tau", "0.9"], ["tau 0.95", "0.9"]),
    (["--weights", "bundled:random"], ["other weights", "bundled:digits"]),
])
def test_build_refuses_bases_that_do_not_fit(bases_and_engine, tmp_path, capsys, argv, words):
    bases, _ = bases_and_engine
    code, _, err = run_cli(capsys, "build", "--bases", bases, "--out", tmp_path / "never", *FAST, *argv)
    assert_one_line_error(code, err, f"--bases {bases}", *words)
    assert not (tmp_path / "never").exists()


def test_build_refuses_a_file_that_is_not_a_calibrate_output(bases_and_engine, tmp_path, capsys):
    _, plain = bases_and_engine
    for given, words in ((plain / "bases.safetensors", ["does not say what it was calibrated for"]),
                         (tmp_path / "missing.safetensors", ["not found"])):
        code, _, err = run_cli(capsys, "build", "--bases", given, "--out", tmp_path / "never", *FAST)
        assert_one_line_error(code, err, "--bases", *words)
    assert not (tmp_path / "never").exists()


def test_calibrate_takes_calibration_shapes_without_a_range(tmp_path, capsys):
    from svdexport.cache.svd import Bases

    out = tmp_path / "b.safetensors"
    code, _, err = run_cli(capsys, "calibrate", "--out", out, *FAST[:2], "--calib-samples", "2", "--calib-steps", "2",
                           *FAST[4:], "--calib-shapes", "96x160")
    assert code == 0, err
    bases = Bases.load(out)
    assert bases.num_inputs == 2 and bases.origin["family"] == "flux" and bases.origin["granularity"] == "final"
    code, _, err = run_cli(capsys, "calibrate", "--out", out, *FAST, "--calib-shapes", "96x100")
    assert_one_line_error(code, err, "width=100", "multiple of 16")


# ------------------------------------------------------------------------------------------------ bench


def test_bench_has_real_subcommands_and_bench_engine_is_latency(tmp_path, capsys):
    bench = next(a for a in subparser("bench")._actions if isinstance(a, argparse._SubParsersAction))
    assert set(bench.choices) == {"latency", "lora", "shapes", "speedup", "scaling"}
    missing = tmp_path / "missing"
    assert_one_line_error(*run_cli(capsys, "bench", missing)[::2], "engine folder not found")
    assert_one_line_error(*run_cli(capsys, "bench", "latency", missing, "--repeats", "0")[::2], "--repeats")
    assert_one_line_error(*run_cli(capsys, "bench", "shapes", missing)[::2], "--against", "--resolutions")
    assert_one_line_error(*run_cli(capsys, "bench", "lora", missing)[::2], "bench lora", "--lora")
    assert_one_line_error(*run_cli(capsys, "bench", missing, "--against", missing)[::2],
                          "bench shapes ENGINE --against STATIC")
    assert_one_line_error(*run_cli(capsys, "bench", "scaling", missing, "--workers", "0,2")[::2], "--workers")
    assert_one_line_error(*run_cli(capsys, "bench", "speedup", missing, "--predictors", "magic")[::2], "magic")


# ------------------------------------------------------------------------------------------------ progress


def test_a_phase_prints_one_line_with_its_time_and_nothing_when_it_fails(capsys):
    from svdexport.progress import phase
    from svdexport.quiet import quiet

    with phase("exporting"):
        with quiet():  # what a phase captures stays captured; its own line is not
            print("third-party noise", file=sys.stderr)
    with pytest.raises(ValueError):
        with phase("compiling"):
            raise ValueError("boom")
    with phase("hashing", shown_from=60):
        pass
    err = capsys.readouterr().err
    assert err.startswith("exporting ... ") and err.endswith(" s\n") and len(err.splitlines()) == 1, err


def test_on_a_terminal_the_phase_line_counts_up_and_a_failed_one_is_cleared():
    code = ("import sys, time\nfrom svdexport.progress import phase\nfrom svdexport.quiet import quiet\n"
            "with phase('one'):\n    with quiet():\n        print('hidden', file=sys.stderr); time.sleep(1.3)\n"
            "try:\n    with phase('two'):\n        raise ValueError\nexcept ValueError:\n"
            "    print('svdexport: error: x', file=sys.stderr)\n")
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin, stdout and stderr are the terminal
        os.execv(sys.executable, [sys.executable, "-c", code])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    text = out.decode()
    assert "\rone ... 0 s\x1b[K" in text and re.search(r"\rone \.\.\. [1-9] s\x1b\[K", text), repr(text)
    assert re.search(r"\r\x1b\[Kone \.\.\. 1\.\d s\r\n", text) and "hidden" not in text, repr(text)
    assert text.endswith("\r\x1b[Ksvdexport: error: x\r\n")  # two's line erased: the error stands alone
