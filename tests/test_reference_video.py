"""The bundled trained reference video model (HunyuanVideo on moving digits): provenance and sample quality.

The quality measures, per generated clip [1, F, S, S] in [-1, 1]:
- class: in every frame the 8x8 window of most ink is cut out and an RBF SVM trained on scikit-learn's
  digits (bench/compare.py's `_classifier`) labels it; a frame counts when the label is the requested digit.
- direction: the ink centroid of consecutive frames moves the requested way (more along the requested axis,
  in the requested sense, than across it) for every frame pair.
Both are checked on the training data itself first, so the measures are known to be right.
"""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from svdexport.bench.compare import _classifier
from svdexport.cache.config import CacheConfig
from svdexport.models import hunyuanvideo as hv
from svdexport.models.family import Conditioning
from svdexport.models.hunyuanvideo import HUNYUANVIDEO as HV
from svdexport.models.weights import load_table
from svdexport.runtime.scheduler import CachedSampler

FOLDER = HV.bundled["digits"]
DIRECTIONS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}  # (dy, dx) per frame
SCRIPT = Path(__file__).parents[1] / "scripts" / "train_reference_video.py"


def requested(label: str) -> tuple[int, str]:
    """'3 right' -> (3, 'right')."""
    digit, direction = label.split()
    return int(digit), direction


def frame_labels(classifier, videos: torch.Tensor) -> torch.Tensor:
    """Per frame of videos [N, 1, F, H, W] in [-1, 1], the SVM's digit [N, F]: of the 8x8 windows that hold
    nearly all the frame's ink (several, where a digit has blank rows or columns), the one the SVM is
    surest of, read on the dataset's 0..16 scale."""
    ink = ((videos[:, 0].clamp(-1, 1) + 1) / 2).flatten(0, 1)  # [N F, H, W], 0 = background
    h, w = ink.shape[-2:]
    sums = F.avg_pool2d(ink[:, None], 8, stride=1)[:, 0] * 64  # ink inside each window [N F, h-7, w-7]
    labels = []
    for frame, s in zip(ink, sums):
        corners = (s >= 0.97 * s.max()).nonzero().tolist()
        windows = torch.stack([frame[y:y + 8, x:x + 8].flatten() * 16 for y, x in corners]).numpy()
        scores = classifier.decision_function(windows)  # [windows, 10], one-vs-rest
        best = scores[scores.max(1).argmax()]  # the surest window's scores
        labels.append(int(classifier.classes_[best.argmax()]))
    return torch.tensor(labels).reshape(videos.shape[0], videos.shape[2])


def class_accuracy(classifier, videos: torch.Tensor, digits: list[int]) -> float:
    """Share of all frames the SVM labels as the clip's requested digit."""
    return (frame_labels(classifier, videos) == torch.tensor(digits)[:, None]).float().mean().item()


def centroids(videos: torch.Tensor) -> torch.Tensor:
    """Ink centroid (y, x) per frame: [N, F, 2]."""
    ink = ((videos[:, 0].clamp(-1, 1) + 1) / 2)
    h, w = ink.shape[-2:]
    total = ink.sum((-2, -1)).clamp_min(1e-6)
    y = (ink * torch.arange(h).view(h, 1)).sum((-2, -1)) / total
    x = (ink * torch.arange(w).view(1, w)).sum((-2, -1)) / total
    return torch.stack([y, x], -1)


def direction_accuracy(videos: torch.Tensor, directions: list[str]) -> float:
    """Share of clips whose every consecutive frame pair moves the requested way."""
    moves = centroids(videos).diff(dim=1)  # [N, F-1, 2]
    want = torch.tensor([DIRECTIONS[d] for d in directions], dtype=torch.float32)[:, None]  # [N, 1, 2]
    along = (moves * want).sum(-1)
    across = (moves * want.flip(-1)).sum(-1).abs()
    return ((along > 0.5) & (along > across)).all(1).float().mean().item()


def training_module():
    spec = importlib.util.spec_from_file_location("train_reference_video", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_weights_are_small_documented_and_match_their_hashes():
    meta = json.loads((FOLDER / "svdexport.json").read_text())
    assert (FOLDER / "diffusion_pytorch_model.safetensors").stat().st_size <= 10 * 2**20
    assert set(meta["sha256"]) == {"diffusion_pytorch_model.safetensors", "conditioning.safetensors"}
    for name, digest in meta["sha256"].items():
        assert hashlib.sha256((FOLDER / name).read_bytes()).hexdigest() == digest
    training = meta["training"]
    assert training["seed"] == 0 and training["steps"] == training["loss"][-1]["step"]
    assert training["loss"][-1]["loss"] < training["loss"][0]["loss"] / 2  # it learned
    labels = meta["conditioning"]["labels"]
    assert meta["conditioning"]["kind"] == "class-table" and len(labels) == 40 and labels[:2] == ["0 right", "0 left"]


def test_bundled_digits_is_registered_with_its_table_and_shapes():
    info = HV.inspect("bundled:digits")
    assert info.conditioning["kind"] == "class-table" and info.conditioning["file"] in info.files
    shapes = hv.VideoShapes(**info.shapes)
    table = load_table(info.conditioning["file"])
    side = json.loads((FOLDER / "svdexport.json").read_text())["pixels"]["side"]
    # No VAE: the latent tensor is the pixel clip, 1 channel x 3 frames x side x side.
    assert (info.config["in_channels"], *shapes.latent) == (1, 3, side, side)
    assert table["encoder_hidden_states"].shape == (40, shapes.text_len, info.config["text_embed_dim"])
    assert table["pooled_projections"].shape == (40, info.config["pooled_projection_dim"])
    assert table["encoder_attention_mask"].shape == (40, shapes.text_len)
    x = HV.example_inputs(info.config, hv.VideoShapes(**{**info.shapes, "batch": 2}), seed=0,
                          conditioning=Conditioning(table, [13, 2]))
    assert torch.equal(x["pooled_projections"], table["pooled_projections"][[13, 2]])
    assert torch.equal(x["encoder_attention_mask"], table["encoder_attention_mask"][[13, 2]].long())
    assert x["hidden_states"].shape == (2, 1, 3, side, side) and "guidance" not in x
    with pytest.raises(Exception, match="labels must be"):
        HV.example_inputs(info.config, shapes, seed=0, conditioning=Conditioning(table, [40]))


def test_the_measures_recognise_the_training_clips():
    """On clips the training script makes, the crop classifier and the direction measure are right."""
    train = training_module()
    pixels = json.loads((FOLDER / "svdexport.json").read_text())["pixels"]
    train.SIDE, train.STEP = pixels["side"], pixels["step"]  # as the bundled model was trained
    digits, targets = train.load_digits()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, len(digits), (200,), generator=g)
    direction = torch.randint(0, 4, (200,), generator=g)
    offset = torch.randint(0, train.SIDE - 7, (200,), generator=g)
    videos = train.clips(digits[idx], direction, offset)
    assert videos.shape == (200, 1, 3, train.SIDE, train.SIDE)
    assert class_accuracy(_classifier(), videos, targets[idx].tolist()) >= 0.97
    names = [train.DIRECTIONS[d] for d in direction]
    assert direction_accuracy(videos, names) == 1.0
    assert direction_accuracy(videos, [{"right": "left", "left": "right", "down": "up", "up": "down"}[d]
                                       for d in names]) == 0.0


def generate(labels: list[int], steps: int = 50, seed: int = 2026,
             weights: str = "bundled:digits") -> tuple[torch.Tensor, list[str]]:
    """Full compute with the family's own sampler: every step a full step."""
    info = HV.inspect(weights)
    model = HV.load(info, torch.float32)
    table = load_table(info.conditioning["file"])
    shapes = hv.VideoShapes(**{**info.shapes, "batch": len(labels)})
    inputs = HV.example_inputs(dict(model.config), shapes, seed=seed, conditioning=Conditioning(table, labels))
    full, cached = HV.graphs(model, "final")
    loop = CachedSampler(full, cached, torch.zeros(1, HV.hidden_size(dict(model.config)), 1),
                         CacheConfig(warmup=steps, interval=1), HV.sampling(hv.SAMPLER_CONFIG), shapes)
    with torch.no_grad():
        latents = loop.generate(inputs, steps=steps).latents
    return HV.unpack(latents, shapes), [info.conditioning["labels"][y] for y in labels]


@pytest.mark.slow
@pytest.mark.extended
def test_generated_clips_show_the_requested_digit_moving_the_requested_way():
    videos, names = generate(list(range(40)))  # every (digit, direction) once
    digits, directions = zip(*map(requested, names))
    classes, motion = class_accuracy(_classifier(), videos, list(digits)), direction_accuracy(videos, list(directions))
    print(f"\n40 clips, 50 full steps: class accuracy {classes:.3f} (frames), direction accuracy {motion:.3f} (clips)")
    assert classes >= 0.6, classes  # measured 0.65 (60% of clips right in all three frames)
    assert motion >= 0.95, motion  # measured 1.0
