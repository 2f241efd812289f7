"""svdexport batch on a local Ray runtime: two workers, one killed mid-run, every item exactly once."""

import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'svdexport[ray]'")

from svdexport.batch.runner import NAMESPACE, BatchOptions, run  # noqa: E402
from svdexport.cache.config import step_plan  # noqa: E402
from svdexport.cli import main  # noqa: E402
from helpers import assert_one_line_error, digits_model, make_lora, run_cli  # noqa: E402

pytestmark = pytest.mark.slow  # engines of every backend or whole pipelines: the full suite only

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


def test_killed_worker_loses_nothing_and_duplicates_nothing(engine, tmp_path):
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
    full = sum(step_plan(200, 3, 7))  # the engine's schedule
    assert all((m["full_steps"], m["cached_steps"]) == (full, 200 - full) for m in lines)


def pixels(path):
    return np.asarray(Image.open(path))


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
