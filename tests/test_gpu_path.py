"""The GPU hot path, tested on a CPU: static input buffers replayed from one capture (a stand-in for CUDA-graph
capture that recomputes into the captured outputs), ONNX Runtime's output device, TensorRT's timing cache."""

import warnings
from pathlib import Path

import pytest
import torch

from helpers import TINY_SHAPES, cached_sampler, tiny_model
from svdexport.models.flux import FLUX
from svdexport.runtime import static
from svdexport.runtime.scheduler import CachedSampler


class Toy:
    """y = 2a + b, recording the storage its inputs came from."""

    input_names = ["a", "b"]
    output_names = ["y"]

    def __init__(self):
        self.seen = []

    def __call__(self, a, b):
        self.seen.append((a.data_ptr(), b.data_ptr()))
        return 2 * a + b


def test_inputs_are_copied_in_place_into_static_buffers_and_outputs_stay_valid():
    toy = Toy()
    g = static.StaticGraph(toy, capture=static.replaying_capture, warmup=1)
    b = torch.zeros(3)
    y1 = g(torch.ones(3), b)  # warm-up: plain call over the buffers
    y2 = g(torch.full((3,), 2.0), b)  # capture, then replay
    y3 = g(torch.full((3,), 3.0), b)  # replay only
    assert g.captured and len({p for p in toy.seen}) == 1  # every call read the same two buffers
    b.add_(1.0)  # an in-place change of an input is seen (its version moved)
    y4 = g(torch.full((3,), 3.0), b)
    assert [y.tolist() for y in (y1, y2, y3, y4)] == [[2.0] * 3, [4.0] * 3, [6.0] * 3, [7.0] * 3]
    assert y2.data_ptr() != y3.data_ptr()  # handed-out outputs are copies: a replay does not overwrite them


def test_unchanged_inputs_are_not_copied_again(monkeypatch):
    g = static.StaticGraph(Toy(), capture=static.replaying_capture)
    a, b = torch.ones(3), torch.zeros(3)
    g(a, b)
    copies = []
    original = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, *k: copies.append(src) or original(self, src, *k))
    g(torch.ones(3), b)  # a new a is copied; b (same tensor, same version) is not
    assert sum(1 for c in copies if c is b) == 0 and len([c for c in copies if c.shape == (3,)]) >= 1


def test_cached_sampler_over_static_graphs_gives_identical_latents():
    shapes = TINY_SHAPES
    model = tiny_model(guidance=True)
    plain = cached_sampler(model, "block", shapes, warmup=2, interval=3)  # full steps 0, 1, 4, 7
    inputs = FLUX.example_inputs(dict(model.config), shapes, seed=7)
    want = plain.generate(inputs, steps=8).latents
    full, cached = static.static_pair(plain.full, plain.cached, capture=static.replaying_capture)
    loop = CachedSampler(full, cached, plain.bases, plain.cache, plain.sampling, shapes)
    got = [loop.generate(inputs, steps=8).latents for _ in range(2)]  # the second request replays throughout
    assert full.captured and cached.captured
    assert all(torch.equal(g, want) for g in got)


def test_a_failed_capture_falls_back_to_plain_calls():
    def refuse(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    g = static.StaticGraph(Toy(), capture=refuse, warmup=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = [g(torch.full((2,), float(i)), torch.ones(2)).tolist() for i in range(3)]
    assert y == [[1.0, 1.0], [3.0, 3.0], [5.0, 5.0]] and g.captured is None
    assert len([w for w in caught if "CUDA-graph capture failed" in str(w.message)]) == 1


def test_cuda_graphs_only_for_capturable_backends_on_a_gpu(monkeypatch):
    assert static.enabled("aoti", "cuda") and static.enabled("tensorrt", "cuda")
    assert not static.enabled("aoti", "cpu") and not static.enabled("onnx", "cuda")
    monkeypatch.setenv("SVDEXPORT_CUDA_GRAPHS", "0")
    assert not static.enabled("aoti", "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (real CUDA-graph capture)")
def test_cuda_capture_replays_on_a_gpu():
    toy = Toy()
    g = static.StaticGraph(toy, warmup=1)
    b = torch.zeros(4, device="cuda")
    out = [g(torch.full((4,), float(i), device="cuda"), b) for i in range(4)]
    assert g.captured and [o[0].item() for o in out] == [0.0, 2.0, 4.0, 6.0]


def test_onnx_runtime_binds_on_the_session_device():
    pytest.importorskip("onnxruntime")
    from svdexport.export.onnx import session_device

    assert session_device(["CUDAExecutionProvider", "CPUExecutionProvider"]) == torch.device("cuda", 0)
    assert session_device(["TensorrtExecutionProvider", "CUDAExecutionProvider"]) == torch.device("cuda", 0)
    assert session_device(["CPUExecutionProvider"]) == torch.device("cpu")


def test_tensorrt_timing_cache_lives_in_the_engine_folder(tmp_path):
    from svdexport.export import tensorrt

    opts = tensorrt.compile_options(tmp_path, torch.bfloat16)
    assert Path(opts["timing_cache_path"]) == tmp_path / tensorrt.TIMING_CACHE
    assert opts["enabled_precisions"] == {torch.bfloat16}
    assert tensorrt.BACKEND.carried == (tensorrt.TIMING_CACHE,)


@pytest.mark.slow
def test_a_rebuild_starts_from_the_carried_cache_and_lists_it(tmp_path, monkeypatch):
    from helpers import FAST
    from svdexport.cli import main
    from svdexport.export import eager
    from svdexport.runtime import manifest

    monkeypatch.setattr(eager.EagerBackend, "carried", ("timing_cache.bin",))
    out = tmp_path / "e"
    assert main(["build", "--out", str(out), *FAST]) == 0
    (out / "timing_cache.bin").write_bytes(b"tactics")  # as TensorRT leaves it after a build
    assert main(["build", "--out", str(out), "--interval", "5", *FAST]) == 0  # other settings: a rebuild
    assert (out / "timing_cache.bin").read_bytes() == b"tactics"
    assert "timing_cache.bin" in manifest.read(out).files
