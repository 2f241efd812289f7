"""Outputs are checked before the work and never clobber a user's file; builds lock their folders and clean
up after killed builds; every error is one line; the same seed writes the same bytes."""

import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import quick_engine, FAST, assert_one_line_error, run_cli
from svdexport.cli import main
from svdexport.files import remove_stale

FAST = [*FAST, "--calib-steps", "1"]  # one calibration step: these tests need an engine, not good bases


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return quick_engine(tmp_path_factory, "outputs")


@pytest.fixture
def no_work(monkeypatch):
    """Makes every long piece of work fail loudly: a check that comes after it is a test failure."""
    from svdexport.bench import compare, latency
    from svdexport.builder import build
    from svdexport.runtime import engine

    def boom(*a, **k):
        raise AssertionError("the work started before the outputs were checked")

    for module, name in ((build, "run_calibration"), (engine.Engine, "generate"), (latency, "bench"),
                         (compare, "compare")):
        monkeypatch.setattr(module, name, boom)


# ------------------------------------------------------------------------------------------------ late paths


def test_build_into_a_path_under_a_file_fails_before_calibrating(tmp_path, capsys, no_work):
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(capsys, "build", "--out", tmp_path / "afile" / "eng", *FAST)
    assert_one_line_error(code, err, "is a file, not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_build_into_a_read_only_folder_fails_before_calibrating(tmp_path, capsys, no_work):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    code, _, err = run_cli(capsys, "build", "--out", ro / "eng", *FAST)
    assert_one_line_error(code, err, "permission denied")


def test_calibrate_refuses_a_users_file_before_calibrating(tmp_path, capsys, no_work):
    mine = tmp_path / "mine.safetensors"
    save_file({"w": torch.ones(2)}, str(mine))
    code, _, err = run_cli(capsys, "calibrate", "--out", mine, *FAST)
    assert_one_line_error(code, err, "not written by svdexport", "--force")
    assert torch.equal(load_file(str(mine))["w"], torch.ones(2))


def test_run_into_a_path_under_a_file_fails_before_generating(built, tmp_path, capsys, no_work):
    (tmp_path / "img.png").write_bytes(b"not a folder")
    code, _, err = run_cli(capsys, "run", built, "--out", tmp_path / "img.png" / "x.png")
    assert_one_line_error(code, err, "is a file, not a folder")


def test_bench_json_is_checked_first_and_its_parents_are_created(built, tmp_path, capsys, monkeypatch, no_work):
    from svdexport.bench import latency

    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": true}')
    code, _, err = run_cli(capsys, "bench", built, "--json", mine)
    assert_one_line_error(code, err, "not written by svdexport")
    assert json.loads(mine.read_text()) == {"mine": True}

    monkeypatch.setattr(latency, "bench", lambda *a, **k: {"ratios": {"x": 1.0}})
    monkeypatch.setattr(latency, "format_report", lambda r: "report")
    target = tmp_path / "nodir" / "deeper" / "b.json"
    code, _, err = run_cli(capsys, "bench", built, "--json", target)
    assert code == 0, err
    assert json.loads(target.read_text()) == {"written_by": "svdexport", "ratios": {"x": 1.0}}
    assert run_cli(capsys, "bench", built, "--json", target)[0] == 0  # its own file is replaced


def test_compare_checks_every_output_and_temporal_before_the_work(built, tmp_path, capsys, no_work):
    code, _, err = run_cli(capsys, "compare", built, "--json", tmp_path / "c.json", "--temporal", tmp_path / "t.png")
    assert_one_line_error(code, err, "--temporal is for video models")
    (tmp_path / "docs_grid.png").write_bytes(b"a user's picture")
    code, _, err = run_cli(capsys, "compare", built, "--docs", tmp_path / "docs.md")
    assert_one_line_error(code, err, "docs_grid.png", "not written by svdexport")
    code, _, err = run_cli(capsys, "compare", built, "--json", tmp_path / "same", "--md", tmp_path / "same")
    assert_one_line_error(code, err, "same file")
    code, _, err = run_cli(capsys, "compare", built, "--grid", built / "grid.png")
    assert_one_line_error(code, err, "inside the engine folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs_grid.png"]


def test_batch_out_inside_an_engine_is_refused(built, tmp_path, capsys):
    (tmp_path / "items.txt").write_text("3\n")
    code, _, err = run_cli(capsys, "batch", built, "--prompts", tmp_path / "items.txt", "--out", built / "batch")
    assert_one_line_error(code, err, "inside the engine folder")
    assert not (built / "batch").exists()


# ------------------------------------------------------------------------------------------------ clobbering


def test_run_never_overwrites_a_users_sidecar(built, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    save_file({"mine": torch.arange(3.0)}, str(out / "model.safetensors"))
    code, _, err = run_cli(capsys, "run", built, "--steps", 4, "--out", out / "model.png")
    assert_one_line_error(code, err, "model.safetensors exists and was not written by svdexport")
    assert torch.equal(load_file(str(out / "model.safetensors"))["mine"], torch.arange(3.0))
    assert not (out / "model.png").exists()

    code, _, err = run_cli(capsys, "run", built, "--steps", 4, "--out", out / "model.png", "--force")
    assert code == 0, err
    assert load_file(str(out / "model.safetensors"))["latents"].shape == (1, 64, 4)
    code, _, err = run_cli(capsys, "run", built, "--steps", 4, "--out", out / "model.png")  # now svdexport's own
    assert code == 0, err


def test_run_inside_the_engine_folder_is_refused(built, tmp_path, capsys):
    before = (built / "bases.safetensors").read_bytes()
    code, _, err = run_cli(capsys, "run", built, "--out", built / "bases.png")
    assert_one_line_error(code, err, "inside the engine folder")
    assert (built / "bases.safetensors").read_bytes() == before and not (built / "bases.png").exists()


def test_build_inside_an_engine_folder_and_over_a_users_folder_is_refused(built, tmp_path, capsys, no_work):
    code, _, err = run_cli(capsys, "build", "--out", built / "nested", *FAST)
    assert_one_line_error(code, err, "inside the engine folder")
    code, _, err = run_cli(capsys, "build", "--backend", "inductor", "--out", tmp_path / "e", "--graphs", built, *FAST)
    assert_one_line_error(code, err, "--graphs", "is an engine folder")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, _, err = run_cli(capsys, "build", "--out", mine, *FAST)
    assert_one_line_error(code, err, "not an svdexport output", "--force")


def test_force_replaces_a_users_folder_only_when_the_build_succeeds(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("replace me")
    code, _, err = run_cli(capsys, "build", "--out", mine, "--force", *FAST)
    assert code == 0, err
    assert (mine / "manifest.json").is_file() and not (mine / "notes.txt").exists()


# ------------------------------------------------------------------------------------------------ locks, leftovers


def test_a_second_build_into_the_same_folder_is_refused(tmp_path, capsys, monkeypatch):
    from svdexport import outputs

    out = tmp_path / "eng"
    monkeypatch.setattr(outputs, "LOCK_WAIT_S", 0.2)
    held, release = threading.Event(), threading.Event()

    def other_build():
        with outputs.output_lock(out):
            held.set()
            release.wait(30)

    t = threading.Thread(target=other_build)
    t.start()
    held.wait(10)
    try:
        code, _, err = run_cli(capsys, "build", "--out", out, *FAST)
    finally:
        release.set()
        t.join()
    assert_one_line_error(code, err, "another svdexport command is writing")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the lock file went with the lock


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.pid


def test_temporaries_of_killed_builds_are_removed_and_live_ones_kept(tmp_path, capsys):
    pid = dead_pid()
    engines, graphs = tmp_path / "engines", tmp_path / "graphs"
    stale = [engines / f".eng.tmp-{pid}-abc123", graphs / f".eng.tmp-{pid}-def456", engines / f".eng.old-{pid}"]
    for d in stale:
        d.mkdir(parents=True)
        (d / "full.aoti.pt2").write_bytes(b"\0" * 1024)
    live = engines / f".eng.tmp-{os.getppid()}-xyz"  # a running process (pytest's parent)
    live.mkdir()
    other = engines / ".other.tmp-1-abc"  # another output's: not this build's business
    other.mkdir()
    code, _, err = run_cli(capsys, "build", "--out", engines / "eng", *FAST)
    assert code == 0, err
    assert not any(d.exists() for d in stale[::2])  # beside --out: gone
    assert live.exists() and other.exists()
    assert remove_stale(graphs / "eng") == [stale[1]] and not stale[1].exists()  # the same rule for --graphs


@pytest.mark.slow
def test_a_killed_build_leaves_nothing_after_the_next_build(tmp_path):
    """A real kill -9 in the middle of an inductor build (while it exports), then a build into the same
    folders: no `.NAME.tmp-*` is left in either."""
    out, graphs = tmp_path / "engines" / "eng", tmp_path / "graphs" / "eng"
    cmd = [sys.executable, "-m", "svdexport.cli", "build", "--backend", "inductor", "--out", str(out),
           "--graphs", str(graphs), *FAST]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import time

    deadline = time.time() + 240
    while time.time() < deadline and not list(graphs.parent.glob(".eng.tmp-*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(graphs.parent.glob(".eng.tmp-*")) or list(out.parent.glob(".eng.tmp-*"))
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert not list(graphs.parent.glob(".eng.*")) and not list(out.parent.glob(".eng.*"))


# ------------------------------------------------------------------------------------------------ one line


@pytest.mark.parametrize("argv,words", [
    (["build", "--tau", "abc"], ["--tau", "invalid float value"]),
    (["build", "--height", "1e3"], ["--height", "invalid int value"]),
    (["run", "x", "--steps", "many"], ["--steps", "invalid int value"]),
    (["bench"], ["required", "engine"]),
    (["frobnicate"], ["invalid choice"]),
])
def test_argparse_errors_are_one_line(capsys, argv, words):
    code, out, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, *words)
    assert out == ""


def test_model_only_options_fail_in_one_line_before_the_work(tmp_path, capsys, no_work):
    code, _, err = run_cli(capsys, "build", "--frames", 9, "--out", tmp_path / "e", *FAST)
    assert_one_line_error(code, err, "flux has no frames shape")
    (tmp_path / "p.txt").write_text("a cat\n")
    code, _, err = run_cli(capsys, "build", "--calibration-prompts", tmp_path / "p.txt", "--out", tmp_path / "e", *FAST)
    assert_one_line_error(code, err, "needs text encoders", "bundled:digits")


def test_help_shows_the_default_models_values_and_every_name(capsys, monkeypatch):
    from svdexport.cache.predictors import PREDICTORS
    from svdexport.export import BACKENDS
    from svdexport.models import FAMILIES

    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: nothing wrapped
    code, out, _ = run_cli(capsys, "build", "--help")
    assert code == 0
    text = " ".join(out.split())
    digits = FAMILIES["flux"].default_shapes(FAMILIES["flux"].inspect(None))
    height, text_len = (re.search(rf"--{o} N (.*?) --", text).group(1) for o in ("height", "text-len"))
    assert height.startswith("height in pixels") and f"(default: the model's: flux (bundled:digits) {digits.height}" \
        in height
    assert text_len.startswith("text tokens") and \
        f"(default: the model's: flux (bundled:digits) {digits.text_len}" in text_len
    for name, fam in FAMILIES.items():
        assert name in text and all(f"bundled:{b}" in text for b in fam.bundled)
    assert all(b in text for b in BACKENDS) and all(p in text for p in PREDICTORS)
    for default in ("block | final: where the cache sites are (default: final", "(default: svd-fitted)",
                    "(default: 0.95", "(default: 64", "the EMA weight on the old value, default 0.9",
                    "order 1 or 2 (svd-taylor's finite differences, default 1)", "svd-taylor (order, gamma)"):
        assert default in text, default


# ------------------------------------------------------------------------------------------------ bytes


def test_same_seed_writes_byte_identical_files(built, tmp_path, capsys):
    for name in ("a", "b"):
        assert run_cli(capsys, "run", built, "--steps", 4, "--seed", 2, "--out", tmp_path / f"{name}.png")[0] == 0
    for suffix in (".png", ".safetensors"):
        a, b = (tmp_path / f"a{suffix}").read_bytes(), (tmp_path / f"b{suffix}").read_bytes()
        assert a == b, suffix
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:  # still the standard format
        meta = f.metadata()
        assert meta["seed"] == "2" and meta["format"] == "svdexport.latents/1"
        assert f.get_tensor("latents").shape == (1, 64, 4)
    assert Image.open(tmp_path / "a.png").info["Software"] == "svdexport"


def test_latents_bytes_do_not_depend_on_the_metadata_order(tmp_path):
    from svdexport.media import safetensors_bytes

    x = {"latents": torch.randn(2, 3), "b": torch.arange(4)}
    one = safetensors_bytes(x, {"seed": "1", "engine": "e", "steps": "3"})
    two = safetensors_bytes(dict(reversed(list(x.items()))), {"steps": "3", "engine": "e", "seed": "1"})
    assert one == two
    (tmp_path / "t.safetensors").write_bytes(one)
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert torch.equal(loaded["latents"], x["latents"]) and torch.equal(loaded["b"], x["b"])



# ------------------------------------------------------------------------------------------------ videos


@pytest.fixture(scope="module")
def video_engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("video") / "engine"
    assert main(["build", "--model", "hunyuanvideo", "--out", str(out), "--calib-samples", "1",
                 "--calib-steps", "2"]) == 0
    return out


@pytest.mark.slow  # a HunyuanVideo build and four generations
def test_video_run_writes_an_mp4_or_gif_with_its_grid_and_latents(video_engine, tmp_path, capsys):
    import av

    code, _, err = run_cli(capsys, "run", video_engine, "--steps", 3, "--out", tmp_path / "v.png")
    assert_one_line_error(code, err, ".gif or .mp4", "video engine")
    code, out, err = run_cli(capsys, "run", video_engine, "--steps", 3, "--out", tmp_path / "v.mp4")
    assert code == 0, err
    with av.open(str(tmp_path / "v.mp4")) as box:
        frames = [f.to_ndarray(format="rgb24") for f in box.decode(video=0)]
    assert len(frames) == 3  # 9 video frames -> 3 latent frames
    grid = Image.open(tmp_path / "v.png")
    assert grid.width == 3 * grid.height and frames[0].shape[:2] == (grid.height, grid.height)
    assert load_file(str(tmp_path / "v.safetensors"))["latents"].shape[0] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4", "v.png", "v.safetensors"]

    assert run_cli(capsys, "run", video_engine, "--steps", 3, "--out", tmp_path / "w.mp4")[0] == 0
    assert (tmp_path / "w.mp4").read_bytes() == (tmp_path / "v.mp4").read_bytes()  # no time stamps inside
    assert run_cli(capsys, "run", video_engine, "--steps", 3, "--out", tmp_path / "g.gif")[0] == 0
    assert Image.open(tmp_path / "g.gif").n_frames == 3


# ------------------------------------------------------------------------------------- writes that cannot work
@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux sysfs, where even root creates no file")
def test_an_out_nothing_can_be_written_to_is_refused_before_the_work(built, tmp_path, capsys, no_work):
    """Permission bits pass /sys for root, and a name too long for the filesystem passes them for everyone:
    the check creates (and removes) a file where the output goes."""
    code, _, err = run_cli(capsys, "run", built, "--out", "/sys/x.png")
    assert_one_line_error(code, err, "--out /sys/x.png", "cannot write in /sys")
    code, _, err = run_cli(capsys, "run", built, "--out", tmp_path / ("n" * 300 + ".png"))
    assert_one_line_error(code, err, "cannot write in", "File name too long")
    assert list(tmp_path.iterdir()) == []


def test_the_write_check_leaves_nothing_behind(tmp_path):
    from svdexport.outputs import check_dir, check_file

    check_file(tmp_path / "new" / "deeper" / "x.png", "--out")
    check_dir(tmp_path / "other" / "engine", "--out")
    (tmp_path / "kept").mkdir()
    check_file(tmp_path / "kept" / "x.png", "--out")
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]


def test_two_outputs_that_are_one_file_through_a_symlinked_folder_are_refused(built, tmp_path, capsys, no_work):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    code, _, err = run_cli(capsys, "compare", built, "--json", tmp_path / "real" / "same", "--md",
                           tmp_path / "link" / "same")
    assert_one_line_error(code, err, "same file")


def partial_then(error, real):
    """A writer that writes a few bytes of its file, then fails as a full or broken disk does."""
    def write(self, target, *a, **k):
        with open(target, "wb") as f:
            f.write(b"\x89PNG partial")
        raise OSError(error, os.strerror(error))
    return write


def test_a_full_disk_while_writing_is_one_line_and_keeps_the_old_file(built, tmp_path, capsys, monkeypatch):
    import errno

    out = tmp_path / "x.png"
    assert run_cli(capsys, "run", built, "--out", out, "--steps", 2)[0] == 0
    before = out.read_bytes()
    monkeypatch.setattr(Image.Image, "save", partial_then(errno.ENOSPC, Image.Image.save))
    code, _, err = run_cli(capsys, "run", built, "--out", out, "--steps", 2, "--seed", 3)
    assert_one_line_error(code, err.splitlines()[-1], f"cannot write {out}", "No space left on device")  # after
    assert "Traceback" not in err  # the sampling's progress bar
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png", "x.safetensors"]  # no temporaries


def test_an_io_error_during_a_build_is_one_line_and_keeps_the_old_engine(built, tmp_path, capsys, monkeypatch):
    import errno
    import hashlib
    import shutil

    from svdexport.cache import svd

    engine = tmp_path / "engine"
    shutil.copytree(built, engine)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in engine.iterdir()}

    def save_tensors(tensors, path, metadata):
        path.write_bytes(b"partial")
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(svd, "save_tensors", save_tensors)
    code, _, err = run_cli(capsys, "build", "--out", engine, *FAST, "--tau", "0.9")  # another engine: a rebuild
    assert_one_line_error(code, err.splitlines()[-1], f"I/O error writing {engine}", "Input/output error")
    assert "Traceback" not in err  # the calibration's progress bars
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in engine.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]  # no temporary folder left
