"""What is verified is what is loaded: engine files are hashed through a descriptor that stays open, and every
backend loads those very bytes, whatever is renamed over the files after the check; a file written in place
meanwhile is refused; the cache of verified hashes keys on device, inode, size, mtime and ctime."""

import hashlib
import json
import os
import shutil
import stat

import pytest
import torch

import svdexport
from helpers import FAST, graph_inputs, quick_engine
from svdexport.cli import main
from svdexport.errors import SvdExportError
from svdexport.runtime import manifest as mf
from svdexport.runtime import trust
from svdexport.verified import DigestMismatch, HashCache, VerifiedFile, VerifiedSet

FAST = [*FAST, "--calib-steps", "1"]


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """A cache of verified hashes of this test's own; no signature required but where a test asks."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(trust.ENV, raising=False)


# ------------------------------------------------------------------------------------------------ primitives


def test_the_link_reads_the_hashed_bytes_after_a_rename_over_the_file(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"checked")
    b.write_bytes(b"foreign")
    f = VerifiedFile(a, hashlib.sha256(b"checked").hexdigest())
    os.replace(b, a)
    assert f.link.read_bytes() == b"checked" and a.read_bytes() == b"foreign"
    f.check_unchanged()  # a rename over the name does not touch the open file
    f.close()


def test_a_mismatch_a_symlink_and_a_fifo_are_refused_in_one_line(tmp_path):
    a = tmp_path / "a.bin"
    a.write_bytes(b"bytes")
    with pytest.raises(DigestMismatch, match=f"{a} is corrupted"):
        VerifiedFile(a, "0" * 64)
    (tmp_path / "link.bin").symlink_to(a)
    assert VerifiedFile(tmp_path / "link.bin").sha256 == sha(a)
    with pytest.raises(SvdExportError, match="is a symlink"):
        VerifiedFile(tmp_path / "link.bin", follow_symlinks=False)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(SvdExportError, match="not a regular file"):  # and the open does not hang
        VerifiedFile(tmp_path / "fifo")


def test_an_in_place_write_is_refused_by_check_unchanged(tmp_path):
    a = tmp_path / "a.bin"
    a.write_bytes(b"\x00" * 64)
    st = a.stat()
    f = VerifiedFile(a, sha(a))
    with open(a, "r+b") as w:
        w.write(b"\x01")
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))  # the mtime put back; the ctime cannot be
    with pytest.raises(SvdExportError, match="changed while it was loaded"):
        f.check_unchanged()


def test_the_set_mirrors_names_and_its_links_go_with_close(tmp_path):
    folder = tmp_path / "engine"
    (folder / "sub").mkdir(parents=True)
    (folder / "m.onnx").write_bytes(b"model")
    (folder / "sub" / "w.data").write_bytes(b"weights")
    files = VerifiedSet(folder, {"m.onnx": sha(folder / "m.onnx"), "sub/w.data": sha(folder / "sub" / "w.data")})
    model, data = files.path("m.onnx"), files.path("sub/w.data")
    assert model.name == "m.onnx" and model.origin == folder / "m.onnx"  # loaders see the name, errors the file
    assert data.parent.parent == model.parent and data.read_bytes() == b"weights"
    assert stat.S_IMODE(model.parent.stat().st_mode) == 0o700  # private: nobody else swaps the links
    fds = [f.fd for f in files.files.values()]
    files.close()
    assert not model.parent.exists()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    with pytest.raises(SvdExportError, match="closed"):
        files.path("m.onnx")


def test_a_symlink_swapped_out_of_the_folder_after_its_check_is_refused(tmp_path):
    folder, outside = tmp_path / "engine", tmp_path / "secret"
    folder.mkdir()
    outside.write_bytes(b"same bytes")
    (folder / "f").symlink_to(outside)  # as if swapped in after files.confined checked it
    with pytest.raises(SvdExportError, match="resolves outside the engine folder"):
        VerifiedFile(folder / "f", sha(outside), within=folder)  # where the opened file really is
    with pytest.raises(SvdExportError, match="not a plain relative path"):
        VerifiedSet(folder, {"../secret": sha(outside)})


def test_the_hash_cache_keys_on_the_ctime_and_survives_damage(tmp_path):
    a = tmp_path / "w.safetensors"
    a.write_bytes(b"\x00" * 4096)
    cache = HashCache()
    assert VerifiedFile(a, use_cache=True).sha256 == sha(a)
    assert stat.S_IMODE(cache.path.stat().st_mode) == 0o600
    assert cache.get(a.stat()) == sha(a)
    st = a.stat()
    with open(a, "r+b") as w:  # an XOR of some bytes, the mtime restored
        w.write(b"\xff" * 8)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.get(a.stat()) is None  # the ctime moved: not served
    assert VerifiedFile(a, use_cache=True).sha256 == sha(a) != cache.get(st)
    for damage in (b"\xff\xfe not json", b"[" * 100_000, b"[]", json.dumps({"x": 5}).encode()):
        cache.path.write_bytes(damage)
        assert VerifiedFile(a, use_cache=True).sha256 == sha(a)  # an empty cache, then written again
        assert cache.get(a.stat()) == sha(a)


def test_a_cache_entry_that_disagrees_is_never_the_reason_for_a_refusal(tmp_path):
    a = tmp_path / "w.bin"
    a.write_bytes(b"weights")
    HashCache().put(a.stat(), "0" * 64)  # a wrong entry (a damaged cache)
    assert VerifiedFile(a, sha(a), use_cache=True).sha256 == sha(a)


# ------------------------------------------------------------------------------------------------ engines


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    return quick_engine(tmp_path_factory, "verified")


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    d = tmp_path_factory.mktemp("key")
    assert main(["keygen", "--out", str(d / "builder")]) == 0
    return d / "builder"


def signed_copy(src, dst, key):
    shutil.copytree(src, dst)
    assert main(["sign", str(dst), "--key", str(key)]) == 0
    return dst


def after_the_hash(monkeypatch, change):
    """Runs `change(folder)` right after the manifest's read hashed the engine files, before any is loaded."""
    real = mf.read

    def read(folder, *args, **kwargs):
        manifest = real(folder, *args, **kwargs)
        change(folder)
        return manifest

    monkeypatch.setattr(mf, "read", read)


def test_peeks_open_nothing(eager, monkeypatch):
    opened = []
    real = VerifiedFile.__init__
    monkeypatch.setattr(VerifiedFile, "__init__",
                        lambda self, path, *a, **k: opened.append(path) or real(self, path, *a, **k))
    assert mf.read(eager, hash_files=False).opened is None and opened == []
    assert set(mf.read(eager).opened.files) == set(mf.read(eager, hash_files=False).files)


def test_an_engine_file_written_in_place_during_the_load_is_refused(eager, tmp_path, monkeypatch):
    engine = shutil.copytree(eager, tmp_path / "engine")

    def xor_in_place(folder):
        with open(folder / "bases.safetensors", "r+b") as f:
            f.seek(-4, os.SEEK_END)
            tail = f.read(4)
            f.seek(-4, os.SEEK_END)
            f.write(bytes(b ^ 0xFF for b in tail))

    after_the_hash(monkeypatch, xor_in_place)
    with pytest.raises(SvdExportError, match="bases.safetensors was changed while it was loaded"):
        svdexport.load(engine)


def test_a_closed_engine_releases_its_files(eager):
    engine = svdexport.load(eager)
    mirror = engine.manifest.path(eager, "bases.safetensors").parent
    assert mirror.is_dir()
    engine.close()
    assert not mirror.exists()


def outputs_close(got, want):
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g, w = g.float(), w.float()
        assert g.shape == w.shape and (g - w).abs().max() <= 1e-5 * w.abs().max()


def check_swap(engine, key, monkeypatch, swaps):
    """Outputs of the full graph from a signed load, while copies of other valid engine files are renamed over
    files (`swaps`: file -> the file whose copy) between the hash and the load, equal those of the engine as
    signed."""
    with svdexport.load(engine) as ref:
        inputs = graph_inputs(ref, "full")
        with torch.no_grad():
            want = ref.full(*inputs)
    listed = mf.read(engine, hash_files=False).files

    def rename_over(folder):
        for target, source in swaps.items():
            shutil.copyfile(folder / source, folder / f".{target}.new")
            os.replace(folder / f".{target}.new", folder / target)

    after_the_hash(monkeypatch, rename_over)
    with svdexport.load(engine, trusted_keys=[key.with_name(key.name + ".pub")]) as loaded:
        assert all(sha(engine / t) != listed[t] for t in swaps)  # the folder now holds other, valid files
        with torch.no_grad():
            outputs_close(loaded.full(*inputs), want)


@pytest.mark.slow
def test_an_aoti_package_renamed_over_after_the_hash_is_not_loaded(fast_aoti_engine, key, tmp_path, monkeypatch):
    engine = signed_copy(fast_aoti_engine, tmp_path / "engine", key)
    check_swap(engine, key, monkeypatch, {"full.aoti.pt2": "cached.aoti.pt2"})


@pytest.fixture(scope="module")
def onnx_engine(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("onnx")
    assert main(["build", "--backend", "onnx", "--out", str(root / "engine"), "--graphs", str(root / "graphs"),
                 *FAST]) == 0
    return root / "engine"


@pytest.mark.slow
@pytest.mark.parametrize("swaps", [{"full.onnx": "cached.onnx"}, {"constants.safetensors": "bases.safetensors"}],
                         ids=["model", "weights"])
def test_an_onnx_model_or_its_weights_renamed_over_after_the_hash_are_not_loaded(onnx_engine, key, tmp_path,
                                                                                  monkeypatch, swaps):
    engine = signed_copy(onnx_engine, tmp_path / "engine", key)
    check_swap(engine, key, monkeypatch, swaps)
