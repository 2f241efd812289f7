"""Nothing left behind: AOTInductor's extracted packages, a batch's workers, a killed batch driver's Ray
runtime; and quiet builds (third-party output captured, no onnxruntime-gpu notice on CPU)."""

import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import svdexport
from helpers import FAST
from svdexport.cli import main

pytestmark = pytest.mark.slow  # compiled engines, subprocesses and Ray

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
HAS_RAY = importlib.util.find_spec("ray") is not None
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}


@pytest.fixture(scope="module")
def aoti(fast_aoti_engine):
    return fast_aoti_engine  # any AOTInductor engine: the session's quick one (conftest.py)


@pytest.fixture
def private_tmp(monkeypatch):
    """A system temporary folder of this test's own (Python's and native code's); a short path, since Ray
    puts its sockets there and Unix socket paths are limited to 107 bytes."""
    import shutil

    d = Path(tempfile.mkdtemp(prefix="sx-", dir="/tmp"))
    monkeypatch.setenv("TMPDIR", str(d))
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith(("svdexport-aoti-", "aotinductor")))


def test_extracted_packages_are_removed_when_the_engine_closes(aoti, private_tmp):
    engine = svdexport.load(aoti)
    extracted = leftovers(private_tmp)
    assert len(extracted) == 1 and extracted[0].startswith(f"svdexport-aoti-{os.getpid()}-")
    assert any((private_tmp / extracted[0]).rglob("*.so"))  # torch extracted into it, not into /tmp
    assert engine.generate(seed=0, steps=3).latents.shape == (1, 64, 4)
    engine.close()
    assert leftovers(private_tmp) == []


def test_extracted_packages_are_removed_at_exit_and_after_a_kill(aoti, private_tmp):
    load = f"import svdexport; e = svdexport.load({str(aoti)!r}); e.generate(steps=2)"
    env = {**ENV, "TMPDIR": str(private_tmp)}
    subprocess.run([sys.executable, "-c", load], check=True, env=env)  # never closed: the exit removes it
    assert leftovers(private_tmp) == []
    proc = subprocess.Popen([sys.executable, "-c", load + "; print('ready', flush=True); import time; time.sleep(60)"],
                            env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = leftovers(private_tmp)  # a killed process cannot clean up...
    assert len(left) == 1 and left[0].startswith(f"svdexport-aoti-{proc.pid}-")
    svdexport.load(aoti).close()  # the next load removes a dead process's folder
    assert leftovers(private_tmp) == []


@pytest.mark.skipif(not HAS_RAY, reason="Ray is an optional extra")
@pytest.mark.extended
def test_a_batch_leaves_no_extracted_package(aoti, tmp_path, private_tmp):
    (tmp_path / "items.txt").write_text("".join(f"{i}\n" for i in range(4)))
    cmd = [sys.executable, "-m", "svdexport.cli", "batch", str(aoti), "--prompts", str(tmp_path / "items.txt"),
           "--out", str(tmp_path / "out"), "--workers", "2", "--steps", "4"]
    proc = subprocess.run(cmd, env={**ENV, "TMPDIR": str(private_tmp)}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "out").glob("*.png"))) == 4
    assert leftovers(private_tmp) == []


@pytest.mark.skipif(not HAS_RAY, reason="Ray is an optional extra")
@pytest.mark.extended
def test_a_killed_batch_driver_takes_its_ray_runtime_with_it(tmp_path):
    import psutil

    engine = tmp_path / "engine"
    assert main(["build", "--out", str(engine), *FAST]) == 0
    (tmp_path / "items.txt").write_text("".join(f"{i % 10}\n" for i in range(400)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "svdexport.cli", "batch", str(engine), "--prompts", str(tmp_path / "items.txt"),
           "--out", str(out), "--workers", "2", "--steps", "50"]
    driver = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not list(out.glob("0*.json")):
        time.sleep(0.1)
    assert list(out.glob("0*.json")), "the batch never started"
    ray_procs = [p for p in psutil.Process(driver.pid).children(recursive=True)
                 if "watchdog" not in " ".join(p.cmdline())]
    assert len(ray_procs) >= 3  # GCS, raylet, workers...
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    _, alive = psutil.wait_procs(ray_procs, timeout=20)
    assert [p.pid for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []


@pytest.mark.skipif(not HAS_ONNX, reason="onnx extra not installed")
def test_onnx_build_prints_only_svdexports_lines(tmp_path):
    cmd = [sys.executable, "-m", "svdexport.cli", "build", "--backend", "onnx", "--out", str(tmp_path / "e"),
           "--graphs", str(tmp_path / "g"), *FAST]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "onnxruntime-gpu" not in proc.stdout + proc.stderr
    prefixes = ("dtype ", "built ", "exported graphs", "parameters:", "ranks ", "calibrated plan of ", "weights:",
                "memory:")
    assert [line for line in proc.stdout.splitlines() if not line.startswith(prefixes)] == []
    # stderr holds only svdexport's own progress: bars (carriage-return updates of "calibrating", "planning")
    # and phase lines ("exporting the full graph (torch.export) ... 2.1 s"); nothing the exporters print
    phase_line = re.compile(r"^[a-z].* \.\.\. \d+\.\d s$")
    assert [s for s in proc.stderr.replace("\r", "\n").splitlines()
            if s.strip() and "calibrating" not in s and "planning" not in s and not phase_line.match(s)] == []


# ------------------------------------------------------------------------------------------------ rename window

# A build that replaces `target` (atomic_dir) and is killed (os._exit) right after its first rename, with the
# exchange of the two folders (renameat2) where this machine has it, or without ("no-exchange").
KILLED_REPLACE = """
import os, sys
from pathlib import Path
from svdexport import files
if sys.argv[2] == "no-exchange":
    files.exchange = lambda a, b: False
real_rename = Path.rename
def rename_and_die(self, target):
    real_rename(self, target)
    os._exit(9)
Path.rename = rename_and_die
with files.atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "manifest.json").write_text("new")
"""


def killed_replace(target: Path, how: str) -> int:
    target.mkdir(parents=True)
    (target / "manifest.json").write_text("old")
    proc = subprocess.run([sys.executable, "-c", KILLED_REPLACE, str(target), how], env=ENV, capture_output=True)
    assert proc.returncode in (0, 9), proc.stderr
    return proc.returncode


def test_a_build_killed_while_it_replaces_an_engine_never_leaves_it_missing(tmp_path):
    from svdexport.files import exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    if not exchange(a, b):
        pytest.skip("this filesystem or kernel has no RENAME_EXCHANGE")
    target = tmp_path / "engines" / "eng"
    assert killed_replace(target, "exchange") == 0  # one exchange: no rename to be killed after
    assert (target / "manifest.json").read_text() == "new"
    assert not list(target.parent.glob(".eng.*"))


def test_a_build_killed_between_its_two_renames_gets_the_old_engine_back(tmp_path):
    from svdexport.outputs import check_dir

    target = tmp_path / "engines" / "eng"
    assert killed_replace(target, "no-exchange") == 9
    assert not target.exists() and list(target.parent.glob(".eng.old-*"))  # the kill's window
    check_dir(target, "--out")  # what the next build does first (files.remove_stale)
    assert (target / "manifest.json").read_text() == "old"
    assert not list(target.parent.glob(".eng.*"))
