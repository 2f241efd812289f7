"""A manifest edited as anyone can (its digest recomputed, as test_trust.py's `forge`), or engine files replaced
with their hashes relisted, is refused in one line before any work: never a traceback from deep inside torch,
diffusers or a compiled graph."""

import hashlib
import json
import shutil

import pytest
import torch

import svdexport
from helpers import assert_one_line_error, quick_engine, run_cli
from svdexport.cli import main
from svdexport.errors import SvdExportError
from svdexport.runtime import manifest as mf


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return quick_engine(tmp_path_factory, "fields")


@pytest.fixture
def engine(built, tmp_path):
    dst = tmp_path / "engine"
    shutil.copytree(built, dst)
    return dst


@pytest.fixture
def no_work(monkeypatch):
    from svdexport.runtime import engine

    def boom(*a, **k):
        raise AssertionError("the work started before the manifest was checked")

    monkeypatch.setattr(engine.Engine, "generate", boom)


def forge(folder, edit):
    """Edits the manifest and recomputes its digest, as anyone can."""
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    data["manifest_sha256"] = mf._digest(data)
    (folder / "manifest.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def relist(folder, name):
    """Lists the current hash of an engine file that was replaced."""
    forge(folder, lambda d: d["files"].__setitem__(name, hashlib.sha256((folder / name).read_bytes()).hexdigest()))


def run_refused(capsys, folder, *words):
    out = folder.parent / "out.png"
    code, _, err = run_cli(capsys, "run", folder, "--out", out, "--steps", "2")
    assert_one_line_error(code, err, *words)
    assert not out.exists()


def renamed(old, new):
    def edit(d):
        d["files"][new] = d["files"].pop(old)
    return edit


def put(*path_and_value):
    *path, value = path_and_value

    def edit(d):
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value
    return edit


def first_label(value):
    return lambda d: d["model"]["conditioning"]["labels"].__setitem__(0, value)


FIELDS = {
    "nul-name": (renamed("bases.safetensors", "bases\x00.safetensors"), ["NUL"]),
    "surrogate-site": (lambda d: d["sites"][0].__setitem__("name", "\ud800"), ["sites[0].name", "lone surrogate"]),
    "surrogate-label": (first_label("\udcff"), ["labels[0]", "lone surrogate"]),
    "long-file-name": (renamed("bases.safetensors", "b" * 5000), ["5000 characters"]),
    "long-label": (first_label("x" * 5000), ["labels[0]", "5000 characters"]),
    "dtype": (put("dtype", "nosuch"), ["dtype", "'nosuch'"]),
    "device": (put("device", "bogus"), ["device", "'bogus'"]),
    "shape-type": (put("shapes", "build", "height", "tall"), ["shapes.build.height", "must be int"]),
    "huge-height": (put("shapes", "build", "height", 10**12), ["shapes.build.height"]),
    "huge-batch": (put("shapes", "build", "batch", 10**9), ["shapes.build.batch"]),
    "huge-input": (put("shapes", "inputs", "hidden_states", [10**6, 10**6, 4]), ["shapes.inputs.hidden_states"]),
    "graph-dtype": (lambda d: d["graphs"]["full"]["input_dtypes"].__setitem__(0, "nosuch"), ["input_dtypes[0]"]),
    "sampler": (put("sampler", {"shift": "big", "nosuch": 1}), ["sampler"]),
    "steps": (put("steps", -3), ["steps"]),
}


@pytest.mark.parametrize("case", FIELDS)
def test_a_forged_field_is_refused_in_one_line(engine, capsys, no_work, case):
    edit, words = FIELDS[case]
    forge(engine, edit)
    run_refused(capsys, engine, "manifest field", *words)


@pytest.mark.parametrize("tail,words", [("[" * 100000 + "]" * 100000, ["nested too deeply"]),
                                        ("9" * 5000, ["unreadable", "digits"])], ids=["100k-deep", "5000-digits"])
def test_json_python_cannot_parse_is_refused_in_one_line(engine, capsys, no_work, tail, words):
    text = (engine / "manifest.json").read_text().rstrip().removesuffix("}")
    (engine / "manifest.json").write_text(f'{text}, "zz": {tail}}}\n')
    run_refused(capsys, engine, "manifest.json", *words)


def shrink_bases(folder):
    from safetensors import safe_open

    from svdexport.files import save_tensors

    with safe_open(str(folder / "bases.safetensors"), "pt") as f:
        meta, vectors = f.metadata(), f.get_tensor("bases")
    save_tensors({"bases": vectors[:, : vectors.shape[1] // 2].contiguous()}, folder / "bases.safetensors", meta)
    return "bases.safetensors"


def edit_table(change):
    def make(folder):
        from safetensors.torch import load_file, save_file

        table = load_file(str(folder / "conditioning.safetensors"))
        change(table)
        save_file({k: v.contiguous() for k, v in table.items()}, str(folder / "conditioning.safetensors"))
        return "conditioning.safetensors"
    return make


FILES = {
    "bases-shape": (shrink_bases, ["bases file", "sites x hidden size x k_max"]),
    "table-keys": (edit_table(lambda t: t.__setitem__("pooled", t.pop("pooled_projections"))),
                   ["class table", "no 'pooled_projections'"]),
    "table-shapes": (edit_table(lambda t: t.__setitem__("encoder_hidden_states", t["encoder_hidden_states"][:, :4])),
                     ["class table", "encoder_hidden_states of shape"]),
    "table-rows": (edit_table(lambda t: t.__setitem__("encoder_hidden_states", t["encoder_hidden_states"][:5])),
                   ["class table", "one per label"]),
}


@pytest.mark.parametrize("case", FILES)
def test_a_replaced_file_that_does_not_fit_is_refused_at_load(engine, capsys, no_work, case):
    make, words = FILES[case]
    relist(engine, make(engine))
    run_refused(capsys, engine, *words)


def test_a_100k_deep_signature_is_refused_in_one_line(engine, tmp_path, capsys, no_work):
    assert main(["keygen", "--out", str(tmp_path / "key")]) == 0
    assert main(["sign", str(engine), "--key", str(tmp_path / "key")]) == 0
    (engine / "signature.json").write_text("[" * 100000 + "]" * 100000)
    code, _, err = run_cli(capsys, "run", engine, "--out", tmp_path / "x.png", "--trusted-key", tmp_path / "key.pub")
    assert_one_line_error(code, err, "signature.json", "nested too deeply")


# ------------------------------------------------------------------------- full and cached graphs swapped
def swapped(kind):
    def edit(d):
        names = d["backend_options"][kind]
        names["full"], names["cached"] = names["cached"], names["full"]
    return edit


def test_swapped_aoti_packages_are_refused_at_load(fast_aoti_engine, tmp_path):
    folder = tmp_path / "engine"
    shutil.copytree(fast_aoti_engine, folder)
    forge(folder, swapped("packages"))
    with pytest.raises(SvdExportError, match=r"cached\.aoti\.pt2 is not the graph its manifest loads it as"):
        svdexport.load(folder)


def test_swapped_inductor_programs_are_refused_before_compiling(fast_aoti_engine, tmp_path):
    """An inductor engine made of the aoti engine's exported programs (its graphs folder), listed swapped."""
    folder = tmp_path / "engine"
    shutil.copytree(fast_aoti_engine, folder)
    for name in ("full", "cached"):
        (folder / f"{name}.aoti.pt2").unlink()
        shutil.copy(fast_aoti_engine.parent / "graphs" / f"{name}.pt2", folder / f"{name}.pt2")

    def edit(d):
        d["backend"], d["backend_options"] = "inductor", {"programs": {"full": "cached.pt2", "cached": "full.pt2"}}
        d["files"] = {n: h for n, h in d["files"].items() if not n.endswith(".aoti.pt2")}
        for name in ("full.pt2", "cached.pt2"):
            d["files"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    forge(folder, edit)
    with pytest.raises(SvdExportError, match=r"cached\.pt2 is not the graph its manifest loads it as"):
        svdexport.load(folder)


def test_an_onnx_model_of_the_other_graph_is_refused_when_its_session_opens(tmp_path):
    """ONNX Runtime on a model with the cached graph's inputs, opened as the full graph (and the other way)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from svdexport.export.onnx import OrtGraph

    cached = ["timestep", "pooled_projections", "bases", "coeffs", "residuals"]
    full = ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "rotary_cos", "rotary_sin",
            "bases"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in cached]
    graph = helper.make_graph([helper.make_node("Sum", cached, ["noise_pred"])], "cached", inputs,
                              [helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "cached.onnx")
    assert OrtGraph(tmp_path / "cached.onnx", cached)(*[torch.ones(1)] * 5)[0].item() == 5.0  # it runs as itself
    with pytest.raises(SvdExportError, match="is not the graph its manifest loads it as"):
        OrtGraph(tmp_path / "cached.onnx", full)
