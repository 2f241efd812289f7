"""LoRAs on the tensorrt backend through TensorRT refit (docs/lora.md): what runs without a GPU (the refit
keyword read from torch-tensorrt's compile signature, the manifest flag that tells refittable engines from
older immutable ones, the torch.export program that carries the new weights into the refit) here; the refit
itself where torch-tensorrt and a GPU are (skipped otherwise, and in scripts/gpu_check.py's LoRA step)."""

import importlib.util
import json
import shutil
import types

import pytest
import torch

from helpers import FAST, assert_one_line_error, digits_model, graph_inputs, make_lora, run_cli
from svdexport.errors import SvdExportError
from svdexport.export import LoadSpec, tensorrt
from svdexport.models.flux import FLUX
from svdexport.runtime import manifest as mf

# The manifest of a tensorrt engine built before refit (what every earlier build recorded).
OLD_OPTIONS = {"programs": {"full": "full.trt.pt2", "cached": "cached.trt.pt2"}, "device": "cuda",
               "timing_cache": "timing_cache.bin"}


# torch_tensorrt.dynamo.compile's signatures, as the releases spell them (all take **kwargs).
def compile_2_6(exported_program, inputs=None, *, arg_inputs=None, enabled_precisions=None,
                immutable_weights=True, strip_engine_weights=False, **kwargs):
    pass


def compile_2_5(exported_program, inputs=None, *, arg_inputs=None, enabled_precisions=None,
                make_refittable=False, **kwargs):
    pass


def compile_2_4(exported_program, inputs=None, *, arg_inputs=None, enabled_precisions=None, **kwargs):
    pass


def test_the_refit_keyword_comes_from_the_compile_signature(tmp_path):
    assert tensorrt.refit_options(compile_2_6) == {"immutable_weights": False}
    assert tensorrt.refit_options(compile_2_5) == {"make_refittable": True}
    assert tensorrt.refit_options(compile_2_4) is None  # no refit there: an immutable build
    opts = tensorrt.compile_options(tmp_path, torch.bfloat16, tensorrt.refit_options(compile_2_6))
    assert opts["immutable_weights"] is False and opts["enabled_precisions"] == {torch.bfloat16}
    assert "immutable_weights" not in tensorrt.compile_options(tmp_path, torch.bfloat16)
    # Weight-stripped engines (the weights are bound by a refit at load) where the release has them.
    assert tensorrt.strip_options(compile_2_6, tensorrt.refit_options(compile_2_6)) == {"strip_engine_weights": True}
    assert tensorrt.strip_options(compile_2_5, tensorrt.refit_options(compile_2_5)) == {}
    assert tensorrt.strip_options(compile_2_6, None) == {}


def test_refit_needs_the_feature_and_the_function():
    def module(refit_feature, has_refit):
        dynamo = types.SimpleNamespace(compile=compile_2_6)
        if has_refit:
            dynamo.refit_module_weights = lambda *a, **k: None
        return types.SimpleNamespace(dynamo=dynamo, ENABLED_FEATURES=types.SimpleNamespace(refit=refit_feature))

    assert tensorrt.refit_available(module(True, True)) == {"immutable_weights": False}
    assert tensorrt.refit_available(module(False, True)) is None  # e.g. refit off on Python 3.13
    assert tensorrt.refit_available(module(True, False)) is None


def test_the_manifest_flag_tells_refittable_engines_from_old_ones():
    be = tensorrt.BACKEND
    new, immutable = tensorrt.build_record(True), tensorrt.build_record(False)
    assert new["exported"] == {"full": "full.pt2", "cached": "cached.pt2"} and "exported" not in immutable
    assert new["programs"] == OLD_OPTIONS["programs"]
    assert be.fixed_weights is None and be.weights_refusal(new) is None
    for options in (immutable, OLD_OPTIONS):
        reason = be.weights_refusal(options)
        assert "immutable weights" in reason and "rebuild" in reason and "\n" not in reason
    spec = LoadSpec(graphs={}, dtype="bfloat16", device="cuda", options=OLD_OPTIONS)
    with pytest.raises(SvdExportError, match="rebuild") as e:  # before torch_tensorrt is imported
        be.update_weights((None, None), {"full": {"x": torch.zeros(1)}}, spec)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """An engine folder holding each graph's torch.export program (the inductor backend's, as a refittable
    tensorrt engine holds them) and a LoRA of its model."""
    from svdexport.cli import main

    root = tmp_path_factory.mktemp("trt-refit")
    assert main(["build", "--backend", "inductor", "--out", str(root / "engine"), "--graphs", str(root / "g"),
                 *FAST, "--calib-steps", "1"]) == 0
    return root / "engine", make_lora(root / "lora.safetensors", digits_model())


def bound(folder, graph):
    """The graph's weights as the engine binds them at load (the programs are saved without them)."""
    from svdexport.runtime.bound import open_bound

    return open_bound(mf.read(folder), folder)(graph)


def bound_program(folder, graph="full"):
    from svdexport.export import program_with

    return program_with(torch.export.load(str(folder / f"{graph}.pt2")), bound(folder, graph))


def lora_swap(lora, scale=0.8):
    """The engine's fused weights for `lora`, as Engine.set_loras computes them."""
    from svdexport.models.lora import LoraFile, fuse
    from svdexport.runtime.loras import graph_weights

    model = digits_model()
    return graph_weights(FLUX, model, "final", fuse(model, FLUX.lora_loader, [LoraFile(lora, scale).check()]))


def fused_graph(lora, scale=0.8):
    model = digits_model()
    model.load_lora_adapter(str(lora), prefix="transformer")
    model.fuse_lora(lora_scale=scale)
    return FLUX.graphs(model, "final")[0]


def test_the_program_a_refit_reads_carries_the_fused_weights(programs):
    """What refit_module_weights gets: the graph's own program with the LoRA's weights in its state dict
    (every other weight as built), computing what eager diffusers computes with the LoRA fused; the base
    values pushed back give the program as built."""
    folder, lora = programs
    swap = lora_swap(lora)
    assert all(v.is_meta for v in torch.export.load(str(folder / "full.pt2")).state_dict.values())  # no weights
    program = bound_program(folder)
    built = {k: v.clone() for k, v in program.state_dict.items()}
    changed = tensorrt.with_weights(program, swap.new["full"])
    assert set(changed) == set(swap.new["full"]) and len(changed) > 10
    for fqn, value in program.state_dict.items():
        assert torch.equal(value, swap.new["full"].get(fqn, built[fqn])), fqn
    inputs = graph_inputs(types.SimpleNamespace(manifest=mf.read(folder)), "full")
    with torch.no_grad():
        got, want = program.module()(*inputs)[0], fused_graph(lora)(*inputs)[0]
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    tensorrt.with_weights(program, swap.base["full"])  # unload: the program as built, bit for bit
    assert all(torch.equal(program.state_dict[k], v) for k, v in built.items())
    assert tensorrt.with_weights(bound_program(folder), swap.base["full"]) == {}
    assert all(torch.equal(v, built[k]) for k, v in bound(folder, "full").items())  # the bound weights untouched


def test_a_refit_applies_earlier_changes_and_refuses_unknown_names(programs):
    """TrtGraph.refit's bookkeeping around torch-tensorrt's refit: the program handed over holds the earlier
    LoRA weights plus the new ones; a push of the base values empties what it keeps; a name the program does
    not hold, or a failing refit, is one line and leaves the loaded engines as they were. `refit_fn` stands in
    for refit_module_weights (it returns the program's own module: a module with those weights)."""
    folder, lora = programs
    swap = lora_swap(lora)
    seen = []

    def refit_fn(compiled_module, new_weight_module, in_place):
        seen.append(dict(new_weight_module.state_dict))
        assert not any(v.is_inference() for v in seen[-1].values())  # even when pushed in inference mode
        assert in_place is False  # a saved program's engines are inlined: torch-tensorrt refuses in place
        return new_weight_module.module()

    graph = tensorrt.TrtGraph(module=None, exported=folder / "full.pt2", device="cpu",  # the program's device
                              constants=lambda: bound(folder, "full"))
    first, rest = dict(list(swap.new["full"].items())[:3]), dict(list(swap.new["full"].items())[3:])
    graph.refit("full", first, refit_fn)
    with torch.inference_mode():  # as bench and gpu_check push
        graph.refit("full", rest, refit_fn)
    assert set(graph.changed) == set(swap.new["full"])
    assert all(torch.equal(seen[1][k], v) for k, v in swap.new["full"].items())  # the first push kept
    graph.refit("full", swap.base["full"], refit_fn)
    assert graph.changed == {}
    module = graph.module
    with pytest.raises(SvdExportError, match="holds no weight named nope") as e:
        graph.refit("full", {"nope": torch.zeros(1)}, refit_fn)

    def failing(**kwargs):
        raise AssertionError("Refitting failed.\nmore")

    with pytest.raises(SvdExportError, match="TensorRT refit failed on the full graph: Refitting failed.$") as f:
        graph.refit("full", first, failing)
    assert "\n" not in str(e.value) + str(f.value) and graph.module is module and graph.changed == {}


def forge(folder, edit):
    """Edits the manifest and recomputes its digest, as anyone can (test_trust.py's)."""
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    data["manifest_sha256"] = mf._digest(data)
    (folder / "manifest.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def test_an_old_tensorrt_engine_refuses_a_lora_before_any_work(programs, tmp_path, capsys):
    folder, lora = programs
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    forge(old, lambda m: m.update(backend="tensorrt", backend_options=OLD_OPTIONS))
    assert_one_line_error(*run_cli(capsys, "run", old, "--lora", lora, "--out", tmp_path / "x.png")[::2],
                          "backend 'tensorrt' cannot load a LoRA", "immutable weights", "rebuild")
    if importlib.util.find_spec("torch_tensorrt") and torch.cuda.is_available():
        return  # the rest is the refusal of a machine without them
    # Marked refittable, the LoRA is let through, and the load is what needs a GPU.
    forge(old, lambda m: m.update(backend_options=tensorrt.build_record(True)))
    code, _, err = run_cli(capsys, "run", old, "--lora", lora, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "tensorrt")
    assert "immutable" not in err and not (tmp_path / "x.png").exists()


TRT = importlib.util.find_spec("torch_tensorrt") is not None and torch.cuda.is_available()


@pytest.mark.slow
@pytest.mark.skipif(not TRT, reason="TensorRT refit needs torch-tensorrt and a CUDA GPU")
def test_a_tensorrt_engine_is_refitted_with_a_lora_and_back(tmp_path, programs):
    """The refit on a GPU: a LoRA changes the engine's output to eager's with the LoRA fused (within the
    TensorRT parity bound of test_backends.py, float32 with TF32), unloading gives the base output bit for
    bit, and the engine folder is untouched."""
    import svdexport
    from svdexport.cli import main
    from svdexport.files import sha256_file

    _, lora = programs
    out = tmp_path / "trt"
    assert main(["build", "--backend", "tensorrt", "--device", "cuda", "--out", str(out),
                 "--graphs", str(tmp_path / "g"), *FAST, "--calib-steps", "1"]) == 0
    engine = svdexport.load(out)
    assert engine.manifest.backend_options["refittable"] is True
    files = {f: sha256_file(out / f) for f in engine.manifest.files}
    inputs = {n: graph_inputs(engine, n) for n in ("full", "cached")}
    with torch.no_grad():
        base = [engine.full(*inputs["full"])[0], engine.cached(*inputs["cached"])]
        engine.load_lora(lora, scale=0.8)
        eager = engine.eager_reference()
        for name, b in zip(("full", "cached"), base):
            got, want = getattr(engine, name)(*inputs[name]), getattr(eager, name)(*inputs[name])
            got, want = (got[0], want[0]) if name == "full" else (got, want)
            assert (got.cpu() - b.cpu()).abs().max() > 1e-2 * want.abs().max(), name  # the LoRA changes it
            assert (got.cpu() - want.cpu()).abs().max() <= 1e-3 * want.abs().max(), name
        engine.unload_lora()
        assert torch.equal(engine.full(*inputs["full"])[0], base[0])
        assert torch.equal(engine.cached(*inputs["cached"]), base[1])
    assert files == {f: sha256_file(out / f) for f in engine.manifest.files}
