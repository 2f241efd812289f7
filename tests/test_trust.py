"""Engines are code: every file a backend opens is listed, hashed and confined to the engine folder, and an
engine signed by a trusted key is the only kind a signature-requiring load accepts."""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import svdexport
from helpers import quick_engine, FAST, assert_one_line_error, run_cli
from svdexport import verified
from svdexport.cli import main
from svdexport.errors import SvdExportError
from svdexport.runtime import manifest as mf
from svdexport.runtime import trust

FAST = [*FAST, "--calib-steps", "1"]  # one calibration step: these tests need an engine, not good bases


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return quick_engine(tmp_path_factory, "trust")


@pytest.fixture
def engine(built, tmp_path):
    dst = tmp_path / "engine"
    shutil.copytree(built, dst)
    return dst


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    assert main(["keygen", "--out", str(d / "alice")]) == 0
    assert main(["keygen", "--out", str(d / "mallory")]) == 0
    return d


def forge(folder, edit):
    """Edits the manifest and recomputes its digest, as anyone can."""
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    data["manifest_sha256"] = mf._digest(data)
    (folder / "manifest.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def opened(monkeypatch):
    """Every path the manifest's hash check opens."""
    seen = []
    real = verified.VerifiedFile.__init__

    def record(self, path, *a, **k):
        seen.append(os.path.abspath(path))
        return real(self, path, *a, **k)

    monkeypatch.setattr(verified.VerifiedFile, "__init__", record)
    return seen


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """A cache of verified hashes of this test's own (verified.HashCache)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(trust.ENV, raising=False)


def test_absolute_path_in_the_manifest_is_refused_before_it_is_read(engine, tmp_path, capsys, opened):
    secret = tmp_path / "secret.txt"
    secret.write_text("password hashes")
    forge(engine, lambda m: m["files"].update({str(secret): sha(secret)}))
    code, _, err = run_cli(capsys, "run", engine, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "not a plain relative path")
    assert str(secret) not in opened and not (tmp_path / "x.png").exists()


def test_parent_traversal_of_the_conditioning_table_is_refused(engine, tmp_path, capsys, opened):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(engine / "conditioning.safetensors", outside / "table.safetensors")
    name = "../outside/table.safetensors"

    def edit(m):
        m["model"]["conditioning"]["file"] = name
        m["files"][name] = sha(outside / "table.safetensors")

    forge(engine, edit)
    code, _, err = run_cli(capsys, "run", engine, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, name, "not a plain relative path")
    assert str(outside / "table.safetensors") not in opened


def test_symlink_out_of_the_engine_folder_is_refused(engine, tmp_path, capsys):
    outside = tmp_path / "table.safetensors"
    shutil.move(engine / "conditioning.safetensors", outside)
    (engine / "conditioning.safetensors").symlink_to(outside)  # same bytes: the hash alone would pass
    code, _, err = run_cli(capsys, "run", engine, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "resolves outside the engine folder")


def test_a_file_removed_from_the_list_is_not_loaded(engine, tmp_path, capsys):
    forge(engine, lambda m: m["files"].pop("bases.safetensors"))
    code, _, err = run_cli(capsys, "run", engine, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "bases.safetensors", "does not list")


def test_backend_files_go_through_the_manifest(engine):
    # What aoti, inductor, onnx and tensorrt call: a name from backend_options, resolved by the manifest.
    (engine / "full.aoti.pt2").write_bytes(b"native code the manifest never hashed")
    forge(engine, lambda m: m.update(backend_options={"packages": {"full": "full.aoti.pt2", "cached": "/bin/sh"}}))
    m = mf.read(engine)
    spec = m.load_spec(folder=engine)
    with pytest.raises(SvdExportError, match="does not list"):
        spec.file("packages", "full", engine)
    with pytest.raises(SvdExportError, match="not a plain relative path"):
        spec.file("packages", "cached", engine)
    with pytest.raises(SvdExportError, match="names no programs file"):
        spec.file("programs", "full", engine)


@pytest.mark.parametrize("backend,name,kind", [
    ("aoti", "full.aoti.pt2", "packages"),
    ("inductor", "full.pt2", "programs"),
    ("onnx", "full.onnx", "models"),
])
def test_corrupt_engine_file_with_matching_hash_is_one_line(engine, tmp_path, capsys, backend, name, kind):
    (engine / name).write_bytes(b"PK\x03\x04 not a real archive or model")
    cached = name.replace("full", "cached")
    shutil.copy(engine / name, engine / cached)

    def edit(m):
        m["backend"] = backend
        m["backend_options"] = {kind: {"full": name, "cached": cached}}
        m["files"].update({name: sha(engine / name), cached: sha(engine / cached)})

    forge(engine, edit)
    code, _, err = run_cli(capsys, "run", engine, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, f"cannot load {engine / name}")


def test_keygen_writes_a_private_key_only_its_owner_reads(keys):
    private, public = keys / "alice", keys / "alice.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    assert trust.key_id(trust.load_public(public)) == trust.key_id(trust.load_private(private).public_key())


def test_keygen_never_overwrites_a_key(keys, capsys):
    before = (keys / "alice").read_bytes()
    code, _, err = run_cli(capsys, "keygen", "--out", keys / "alice")
    assert_one_line_error(code, err, "exists")
    assert (keys / "alice").read_bytes() == before


def test_signed_engine_runs_with_its_key_and_is_refused_otherwise(engine, keys, tmp_path, capsys):
    alice, mallory = keys / "alice.pub", keys / "mallory.pub"
    code, _, err = run_cli(capsys, "run", engine, "--trusted-key", alice, "--out", tmp_path / "a.png")
    assert_one_line_error(code, err, "not signed")
    code, _, err = run_cli(capsys, "run", engine, "--require-signature", "--out", tmp_path / "a.png")
    assert_one_line_error(code, err, "--trusted-key")

    code, out, err = run_cli(capsys, "sign", engine, "--key", keys / "alice")
    assert code == 0, err
    code, _, err = run_cli(capsys, "run", engine, "--trusted-key", alice, "--steps", 4, "--out", tmp_path / "a.png")
    assert code == 0, err
    code, _, err = run_cli(capsys, "run", engine, "--trusted-key", mallory, "--out", tmp_path / "b.png")
    assert_one_line_error(code, err, "does not match")
    assert not (tmp_path / "b.png").exists()


def test_forged_digest_is_refused_when_a_signature_is_required(engine, keys, tmp_path, capsys):
    assert main(["sign", str(engine), "--key", str(keys / "alice")]) == 0
    forge(engine, lambda m: m["cache"].update(interval=2))  # a consistent manifest, but not the signed one
    assert mf.read(engine).cache.interval == 2  # without a signature requirement it passes: the digest is no defence
    code, _, err = run_cli(capsys, "run", engine, "--trusted-key", keys / "alice.pub", "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "signature does not match")
    with pytest.raises(SvdExportError, match="signature does not match"):
        svdexport.load(engine, trusted_keys=[keys / "alice.pub"])


def test_environment_variable_requires_signatures_for_every_load(engine, keys, monkeypatch):
    monkeypatch.setenv(trust.ENV, str(keys / "alice.pub"))
    with pytest.raises(SvdExportError, match="not signed"):
        svdexport.load(engine)
    assert main(["sign", str(engine), "--key", str(keys / "alice")]) == 0
    with svdexport.load(engine) as e:
        assert e.manifest.backend == "eager"
    monkeypatch.setenv(trust.ENV, str(keys / "mallory.pub"))
    with pytest.raises(SvdExportError, match="does not match"):
        svdexport.load(engine)


def test_signing_refuses_an_engine_that_fails_its_hashes(engine, keys, capsys):
    data = bytearray((engine / "bases.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (engine / "bases.safetensors").write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "sign", engine, "--key", keys / "alice")
    assert_one_line_error(code, err, "corrupted")
    assert not (engine / trust.SIGNATURE).exists()


def test_signing_refuses_an_edited_manifest(engine, keys, capsys):
    """sign reads the manifest without the typed record (it starts in a fraction of a second), but still refuses
    a manifest edited after the build: its own digest, as a load checks it."""
    data = json.loads((engine / "manifest.json").read_text())
    data["dtype"] = "float16"  # edited, digest not recomputed
    (engine / "manifest.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    code, _, err = run_cli(capsys, "sign", engine, "--key", keys / "alice")
    assert_one_line_error(code, err, "edited after the build")
    assert not (engine / trust.SIGNATURE).exists()


def test_the_same_build_writes_the_same_engine_files(tmp_path):
    """An engine built twice with the same settings has the same file hashes (eager: every file), so a
    rebuild can be compared with an engine from elsewhere; safetensors alone writes metadata in random order."""
    import torch
    from safetensors import safe_open

    from svdexport.files import save_tensors

    meta = {str(i): f"value {i}" for i in range(16)}
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    for i in range(4):
        save_tensors(tensors, tmp_path / f"{i}.safetensors", meta)
    data = {(tmp_path / f"{i}.safetensors").read_bytes() for i in range(4)}
    assert len(data) == 1
    with safe_open(str(tmp_path / "0.safetensors"), framework="pt") as f:
        assert f.metadata() == meta and all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
    for name in ("one", "two"):
        assert main(["build", "--out", str(tmp_path / name), *FAST]) == 0
    one, two = (mf.read(tmp_path / n).files for n in ("one", "two"))
    assert one == two and {"bases.safetensors", "plan_stats.safetensors"} <= set(one)


# ------------------------------------------------------------------------------------------------ fail closed


@pytest.mark.parametrize("value", ["", ":"])
def test_a_variable_that_names_no_key_refuses_every_load(engine, tmp_path, capsys, monkeypatch, value):
    monkeypatch.setenv(trust.ENV, value)
    with pytest.raises(SvdExportError, match="names no public key file"):
        svdexport.load(engine)
    code, _, err = run_cli(capsys, "run", engine, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, trust.ENV, "names no public key file")
    assert not (tmp_path / "x.png").exists()


def test_an_empty_key_list_leaves_the_variable_in_force(engine, keys, monkeypatch):
    monkeypatch.setenv(trust.ENV, str(keys / "alice.pub"))
    with pytest.raises(SvdExportError, match="not signed"):
        svdexport.load(engine, trusted_keys=[])
    assert main(["sign", str(engine), "--key", str(keys / "alice")]) == 0  # signing loads nothing: allowed
    svdexport.load(engine, trusted_keys=[]).close()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_sign_removes_what_a_killed_sign_left(engine, keys):
    dead = engine / f".{trust.SIGNATURE}.tmp-{dead_pid()}"
    live = engine / f".{trust.SIGNATURE}.tmp-{os.getppid()}"  # a running process's (pytest's parent): kept
    for p in (dead, live):
        p.write_text('{"format": "svdexport.signature/1", "key_')
    assert main(["sign", str(engine), "--key", str(keys / "alice")]) == 0
    assert not dead.exists() and live.exists()


# ------------------------------------------------------------------------------------------------ weights


@pytest.fixture
def own_weights(engine, tmp_path):
    """The engine's weights in a folder of this test's own (a copy of the bundled model, mtimes kept), recorded
    as the engine's source, so that the test may change them."""
    from svdexport.models.flux import BUNDLED_DIR

    weights = Path(shutil.copytree(BUNDLED_DIR / "flux_digits", tmp_path / "weights"))
    forge(engine, lambda m: m["model"]["weights"].update(source=str(weights.resolve())))
    return weights


def xor_keeping_mtime(path):
    """Flips the last 64 bytes (tensor data) in place and puts the mtime back, as whoever owns a file can."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(-64, os.SEEK_END)
        data = f.read()
        f.seek(-64, os.SEEK_END)
        f.write(bytes(b ^ 0x5A for b in data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_weights_changed_with_their_mtime_restored_are_refused_by_a_signed_load(engine, own_weights, keys):
    assert main(["sign", str(engine), "--key", str(keys / "alice")]) == 0
    alice = [keys / "alice.pub"]
    svdexport.load(engine, trusted_keys=alice).close()
    xor_keeping_mtime(own_weights / "diffusion_pytorch_model.safetensors")
    with pytest.raises(SvdExportError, match="differ from the ones this engine was built from"):
        svdexport.load(engine, trusted_keys=alice)


def test_weights_changed_with_their_mtime_restored_are_refused_by_an_unsigned_load(engine, own_weights):
    svdexport.load(engine).close()  # their hashes are in the cache now
    xor_keeping_mtime(own_weights / "diffusion_pytorch_model.safetensors")
    with pytest.raises(SvdExportError, match="differ from the ones this engine was built from"):
        svdexport.load(engine)  # the ctime moved: hashed again


def test_unchanged_weights_come_from_the_cache_unless_the_load_is_signed(engine, own_weights, keys, monkeypatch):
    hashed = []
    real = verified.VerifiedFile._hash
    monkeypatch.setattr(verified.VerifiedFile, "_hash",
                        lambda self, *a: hashed.append(self.path.name) or real(self, *a))
    real_bytes = verified.hash_bytes  # the eager backend's weights: the digest of the mapped bytes themselves
    monkeypatch.setattr(verified, "hash_bytes", lambda data, name, *a: hashed.append(name) or real_bytes(data, name, *a))
    weights = "diffusion_pytorch_model.safetensors"
    svdexport.load(engine).close()
    assert weights in hashed
    hashed.clear()
    svdexport.load(engine).close()
    assert weights not in hashed and "bases.safetensors" in hashed  # engine files are hashed on every load
    assert main(["sign", str(engine), "--key", str(keys / "alice")]) == 0
    hashed.clear()
    svdexport.load(engine, trusted_keys=[keys / "alice.pub"]).close()
    assert weights in hashed
