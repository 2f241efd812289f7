"""The bundled trained reference model: provenance and sample quality."""

import hashlib
import json

import pytest
import torch

from svdexport.bench.compare import _accuracy, _classifier
from svdexport.models import flux
from svdexport.models.family import Conditioning
from svdexport.models.flux import FLUX
from svdexport.models.weights import load_table
from svdexport.runtime.scheduler import CachedSampler
from svdexport.cache.config import CacheConfig

FOLDER = FLUX.bundled["digits"]


def test_weights_are_small_documented_and_match_their_hashes():
    meta = json.loads((FOLDER / "svdexport.json").read_text())
    weights = FOLDER / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20
    for name, digest in meta["sha256"].items():
        assert hashlib.sha256((FOLDER / name).read_bytes()).hexdigest() == digest
    training = meta["training"]
    assert training["seed"] == 0 and training["steps"] == training["loss"][-1]["step"]
    assert training["loss"][-1]["loss"] < training["loss"][0]["loss"] / 2  # it learned
    assert meta["conditioning"]["kind"] == "class-table" and len(meta["conditioning"]["labels"]) == 10


@pytest.mark.slow
@pytest.mark.extended
def test_classifier_recognises_95_percent_of_class_conditioned_samples():
    info = FLUX.inspect(None)
    model = FLUX.load(info, torch.float32)
    table = load_table(info.conditioning["file"])
    shapes = flux.FluxShapes(**{**info.shapes, "batch": 100})
    labels = [i % 10 for i in range(100)]
    inputs = FLUX.example_inputs(dict(model.config), shapes, seed=2026, conditioning=Conditioning(table, labels))
    full, cached = FLUX.graphs(model, "final")
    loop = CachedSampler(full, cached, torch.zeros(1, 128, 1), CacheConfig(warmup=50, interval=1),
                         FLUX.sampling(flux.SAMPLER_CONFIG), shapes)
    latents = loop.generate(inputs, steps=50).latents
    images = list(FLUX.unpack(latents, shapes))
    accuracy = _accuracy(_classifier(), images, labels)
    assert accuracy >= 0.95, accuracy
