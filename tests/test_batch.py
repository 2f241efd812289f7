"""svdexport batch on a local Ray runtime: two workers, one killed mid-run, every item exactly once; and the
job folder's files, which a resume reads: damaged ones refused in one line or made again, never a traceback."""

import errno
import importlib.util
import io
import json
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from svdexport.batch import items as store
from svdexport.batch.runner import NAMESPACE, BatchOptions, run
from svdexport.cache.plan import StepPlan
from svdexport.cli import main
from svdexport.errors import SvdExportError
from helpers import assert_one_line_error, digits_model, make_lora, run_cli

# A job on Ray, or an engine built: the full suite only. The job folder's own tests need neither.
slow = pytest.mark.slow
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is an optional extra: pip install 'svdexport[ray]'")

FAST = ["--calib-samples", "1", "--calib-steps", "4"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("batch") / "engine"
    assert main(["build", "--out", str(out), *FAST]) == 0  # the bundled digits model, eager
    return out


def items_file(path, n):
    path.write_text("# classes of the digits model\n" + "".join(f"{i % 10}\n" for i in range(n)))
    return path


def outputs(out):
    return sorted(p.stem for p in out.glob("[0-9]*.json")), sorted(p.stem for p in out.glob("[0-9]*.png"))


@slow
@needs_ray
@pytest.mark.extended
def test_killed_worker_loses_nothing_and_duplicates_nothing(engine, tmp_path):
    import ray

    n, out = 48, tmp_path / "out"
    opts = BatchOptions(engine=str(engine), items=str(items_file(tmp_path / "items.txt", n)), out=str(out),
                        workers=2, steps=200)
    result = {}
    job = threading.Thread(target=lambda: result.update(summary=run(opts, progress=False)))
    job.start()
    deadline = time.time() + 120
    while len(outputs(out)[0]) < 3 and time.time() < deadline:
        time.sleep(0.02)
    ray.kill(ray.get_actor("svdexport-worker-0", namespace=NAMESPACE), no_restart=True)
    job.join(timeout=300)
    s = result["summary"]
    assert s.workers_lost == 1 and s.retried >= 1 and not s.failed
    assert s.done == n  # the driver writes an item only when a worker returns it: a second write would count
    metas, pngs = outputs(out)
    assert metas == pngs == [f"{i:06d}" for i in range(n)]
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [m["index"] for m in lines] == list(range(n))
    assert all(m["text"] == str(m["index"] % 10) and m["seed"] == m["index"] for m in lines)
    assert len({m["worker"] for m in lines}) >= 2  # the replacement worker took over
    full = len(StepPlan.uniform(200, 3, 7).full_steps)  # the engine's schedule
    assert all((m["full_steps"], m["cached_steps"]) == (full, 200 - full) for m in lines)


def pixels(path):
    return np.asarray(Image.open(path))


@slow
@needs_ray
def test_rerun_skips_finished_items_and_redoes_missing_ones(engine, tmp_path, capsys):
    """A job with a LoRA (one Ray start for both checks): its items are what `run --lora` makes of them, and
    a rerun skips the finished ones; with other LoRAs or another seed it is another job."""
    lora = make_lora(tmp_path / "style.safetensors", digits_model())
    items, out = items_file(tmp_path / "items.txt", 6), tmp_path / "out"
    argv = ["batch", engine, "--prompts", items, "--out", out, "--steps", "10", "--lora", f"{lora}:0.8"]
    assert run_cli(capsys, *argv)[0] == 0
    same = ["run", engine, "--label", "2", "--seed", "2", "--steps", "10"]  # item 2: class 2, seed 0 + 2
    assert run_cli(capsys, *same, "--lora", f"{lora}:0.8", "--out", tmp_path / "lora.png")[0] == 0
    assert run_cli(capsys, *same, "--out", tmp_path / "base.png")[0] == 0
    assert np.array_equal(pixels(out / "000002.png"), pixels(tmp_path / "lora.png"))
    assert not np.array_equal(pixels(out / "000002.png"), pixels(tmp_path / "base.png"))
    assert json.loads((out / "000002.json").read_text())["loras"] == [f"{lora.resolve()}:0.8"]
    before = (out / "000002.png").read_bytes()
    (out / "000004.json").unlink()  # as if the run had died between the image and its metadata
    code, stdout, _ = run_cli(capsys, *argv)
    assert code == 0 and "1 done, 5 skipped" in stdout
    assert (out / "000002.png").read_bytes() == before and len(outputs(out)[0]) == 6
    code, _, err = run_cli(capsys, *argv[:-4], "--seed", "7", "--steps", "10", "--lora", f"{lora}:0.8")
    assert_one_line_error(code, err, "another job", "seed")
    assert_one_line_error(*run_cli(capsys, *argv[:-2])[::2], "another job", "loras")


@slow
@pytest.mark.parametrize("lines,argv,words", [
    ("0\n11\n", [], ["'11' is not a class"]),
    ("# only a comment\n", [], ["has no items"]),
    ("0\n", ["--workers", "0"], ["--workers"]),
    ("0\n", ["--lora", "missing.safetensors:0.5"], ["LoRA file not found: missing.safetensors"]),
    ("0\n", ["--lora", "missing.safetensors:big"], ["SCALE must be a number"]),
])
def test_batch_bad_input(engine, tmp_path, capsys, lines, argv, words):
    (tmp_path / "items.txt").write_text(lines)
    code, _, err = run_cli(capsys, "batch", engine, "--prompts", tmp_path / "items.txt", "--out", tmp_path / "o",
                           *argv)
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "o").exists()


@slow
def test_an_echoed_line_is_cut_short(engine, tmp_path, capsys):
    """A 10 MB line that is no class of the engine: the error quotes its start, not 10 MB."""
    (tmp_path / "items.txt").write_text("0\n" + "x" * 10_000_000 + "\n")
    code, _, err = run_cli(capsys, "batch", engine, "--prompts", tmp_path / "items.txt", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "'xxxxxxxx", "(10000000 characters)", "is not a class of this engine")
    assert len(err) < 500


def test_a_failed_items_reason_is_cut_short():
    from svdexport.batch.runner import _reason

    assert len(_reason(ValueError("class " + "y" * 10_000_000 + " is unknown"))) < 400


# ------------------------------------------------------------------------------- the job folder, resumed
DAMAGED = {"not-utf8": b"\xff\xfe{\"seed\": 0}", "a-list": b"[1, 2, 3]",
           "100k-deep": b"[" * 100000 + b"]" * 100000}


def job(tmp_path, lines="0\n1\n"):
    (tmp_path / "items.txt").write_text(lines)
    out = tmp_path / "out"
    store.open_job(out, "key", tmp_path / "items.txt", 0)
    return out, store.read_items(tmp_path / "items.txt", 0)


@pytest.mark.parametrize("data", DAMAGED.values(), ids=DAMAGED)
def test_a_damaged_job_file_is_refused_in_one_line(tmp_path, data):
    out, _ = job(tmp_path)
    (out / "job.json").write_bytes(data)
    with pytest.raises(SvdExportError, match="job.json .*use another --out") as e:
        store.open_job(out, "key", tmp_path / "items.txt", 0)
    assert len(str(e.value).splitlines()) == 1 and len(str(e.value)) < 300


def png_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("data", DAMAGED.values(), ids=DAMAGED)
def test_an_item_with_damaged_metadata_is_not_done(tmp_path, data):
    out, items = job(tmp_path)
    store.write(out, items[1], png_bytes(), {"steps": 2})
    assert store.done(out, items[1])
    (out / "000001.json").write_bytes(data)
    assert not store.done(out, items[1])


def test_an_item_is_done_only_when_its_image_decodes(tmp_path):
    out, items = job(tmp_path)
    png = png_bytes()
    store.write(out, items[1], png, {"steps": 2})
    for damaged in (b"", png[: len(png) // 2]):  # empty, cut short
        (out / "000001.png").write_bytes(damaged)
        assert not store.done(out, items[1])
    (out / "000001.png").write_bytes(png)
    assert store.done(out, items[1]) and store.collect(out, items) == 1


def test_a_full_disk_while_writing_an_item_keeps_the_old_one(tmp_path, monkeypatch):
    out, items = job(tmp_path)
    store.write(out, items[0], png_bytes(), {"steps": 2})
    before = (out / "000000.png").read_bytes()
    real = type(out).write_bytes

    def full(self, data):
        real(self, data[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(type(out), "write_bytes", full)
    with pytest.raises(SvdExportError, match="cannot write .*000000.png: No space left on device"):
        store.write(out, items[0], b"new image", {"steps": 3})
    assert (out / "000000.png").read_bytes() == before and store.done(out, items[0])
    assert sorted(p.name for p in out.iterdir()) == ["000000.json", "000000.png", "job.json"]
