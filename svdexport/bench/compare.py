"""`svdexport compare ENGINE`: the same seeds and classes through eager full compute (the reference), every
predictor of the project, TaylorSeer on the whole feature, the compiled engine and the peer libraries.

Everything runs in one process and interleaved: for each sample, every method runs once, so a drift of
the machine hits all methods alike. Speedups are against eager full compute measured in that same loop.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from svdexport.bench.metrics import psnr, rel_l2, ssim
from svdexport.runtime.scheduler import CachedSampler, Generation

# Eager predictor variants compared: (label, overrides of the engine's cache settings).
PREDICTOR_VARIANTS = [
    ("svd-taylor o1", {"predictor": "svd-taylor", "order": 1}),
    ("svd-taylor o2", {"predictor": "svd-taylor", "order": 2}),
    ("ema-velocity b0.5", {"predictor": "ema-velocity", "beta": 0.5}),
    ("ema-velocity b0.9", {"predictor": "ema-velocity", "beta": 0.9}),
    ("ema b0.5", {"predictor": "ema", "beta": 0.5}),
    ("ema b0.9 (paper)", {"predictor": "ema", "beta": 0.9}),
    ("reuse (FORA)", {"predictor": "reuse"}),
]


@dataclass
class Method:
    name: str  # row label
    backend: str  # what runs it
    run: Callable[[dict, int], Generation]  # (inputs, interval) -> generation
    uncached: bool = False  # the reference: its interval is always 1


def _methods(engine, eager, peers: list[str], steps: int) -> list[Method]:
    from svdexport.bench import peers as peer_lib

    cache = eager.cache
    label = {"svd-taylor": f"svd-taylor o{cache.order}"}.get(cache.predictor, f"{cache.predictor} b{cache.beta}")
    ms = [Method("eager full compute", "eager", lambda x, i: eager.generate(x, steps=steps, interval=1), True)]
    ms.append(Method(f"SVD-Cache {label} (engine)", engine.manifest.backend,
                     lambda x, i: engine.generate(x, steps=steps, interval=i)))
    for label, over in PREDICTOR_VARIANTS:
        ms.append(Method(f"SVD-Cache {label}", "eager",
                         lambda x, i, over=over: eager.generate(x, steps=steps, interval=i, **over)))
    # TaylorSeer on the whole feature: identity bases make C = F and R = 0, so the same forecast runs
    # on the full feature instead of its principal part.
    sites, dim = eager.bases.vectors.shape[:2]
    identity = torch.eye(dim).expand(sites, dim, dim).contiguous().to(eager.device)
    whole = CachedSampler(eager.full, eager.cached, identity, cache, eager.sampling, eager.shapes)
    for order in (1, 2):
        ms.append(Method(f"TaylorSeer whole feature o{order}", "eager",
                         lambda x, i, o=order: whole.generate(
                             x, steps, cache=dataclasses.replace(cache, interval=i, predictor="svd-taylor",
                                                                         order=o))))
    model = eager.full.transformer
    for name in peers:
        ms.append(Method(name, "eager", lambda x, i, n=name: _peer(peer_lib, n, model, x, steps, eager, i)))
    return ms


def _precision_reference(engine, methods: list[Method], steps: int) -> list[Method]:
    """An engine not in float32 is compared with float32 full compute (the reference, first row); its own
    dtype's full compute stays as a row, so the precision loss alone is visible beside the cache's."""
    if engine.dtype == torch.float32:
        return methods
    twin = engine.eager_reference(torch.float32)
    dtype = {"bfloat16": "bf16", "float16": "fp16"}.get(engine.manifest.dtype, engine.manifest.dtype)

    def fp32(x: dict) -> dict:  # the same (rounded) inputs, so only the compute's precision differs
        return {k: v.float() if v.is_floating_point() else v for k, v in x.items()}

    reference = Method("eager fp32 full compute", "eager",
                       lambda x, i: twin.generate(fp32(x), steps=steps, interval=1), True)
    return [reference, dataclasses.replace(methods[0], name=f"eager {dtype} full compute")] + methods[1:]


def _peer(peer_lib, name, model, inputs, steps, eager, interval) -> Generation:
    loop = peer_lib.PeerLoop(eager.family, eager.sampling, eager.shapes, steps)
    r = peer_lib.run_peer(name, model, loop, inputs, eager.cache.warmup, interval)
    return Generation(r.latents, r.full_steps, steps - r.full_steps, r.seconds)


def compare(engine_dir: str, samples: int = 16, steps: int = 50, intervals: tuple[int, ...] = (7,),
            peers: list[str] | None = None, progress: bool = True) -> dict:
    import svdexport
    from svdexport.bench import peers as peer_lib

    engine = svdexport.load(engine_dir)
    m = engine.manifest
    eager = engine.eager_reference()
    unavailable = {p: peer_lib.available(p, engine.family) for p in peer_lib.PEERS}
    peers = [p for p in (peer_lib.PEERS if peers is None else peers) if unavailable[p] is None]
    methods = _precision_reference(engine, _methods(engine, eager, peers, steps), steps)
    labels = [seed % len(engine.labels) for seed in range(samples)] if engine.labels else None
    inputs = [engine.example_inputs(seed, None if labels is None else [labels[seed]] * engine.shapes.batch)
              for seed in range(samples)]
    runs = [(meth, 1 if meth.uncached else iv) for meth in methods for iv in ((1,) if meth.uncached else intervals)]
    results: dict[tuple[str, int], list[Generation]] = {(meth.name, iv): [] for meth, iv in runs}
    with torch.inference_mode():
        methods[0].run(inputs[0], 1)  # warm-up: one-time costs stay out of the timings
        for x in tqdm(inputs, desc="comparing", unit="sample", disable=not progress):
            for meth, iv in runs:  # interleaved: every method once per sample
                results[(meth.name, iv)].append(meth.run(x, iv))
    reference = results[(methods[0].name, 1)]
    ref_images = _images(engine, [g.latents for g in reference])
    ref_latency = statistics.mean(g.seconds for g in reference)
    classifier = _classifier() if labels is not None else None
    video = ref_images[0].dim() == 4  # [C, F, H, W] per sample
    temporal = {"reference": _temporal(ref_images)} if video else {}
    rows = []
    for meth, iv in runs:
        gens = results[(meth.name, iv)]
        images = _images(engine, [g.latents for g in gens])
        latency = statistics.mean(g.seconds for g in gens)
        rows.append({
            "method": meth.name, "backend": meth.backend, "interval": iv,
            "full_steps": gens[0].full_steps, "total_steps": steps,
            "latency_s": latency, "speedup": ref_latency / latency,
            "psnr_db": statistics.mean(min(psnr(a, b), 99.0) for a, b in zip(images, ref_images)),
            "ssim": ssim(_frames(images), _frames(ref_images)),
            "rel_l2": statistics.mean(rel_l2(g.latents, r.latents) for g, r in zip(gens, reference)),
            "class_acc": None if classifier is None else _accuracy(classifier, images, labels),
            "temporal_psnr_db": None,
        })
        if video:
            temporal[f"{meth.name}@{iv}"] = curve = _temporal(images)
            rows[-1]["temporal_psnr_db"] = statistics.mean(curve)
    return {
        "config": {"engine": str(engine_dir), "backend": m.backend, "model": m.model.weights.source,
                   "steps": steps, "samples": samples, "intervals": list(intervals), "cache": m.cache.to_dict(),
                   "shapes": m.shapes.build, "dtype": m.dtype, "reference": methods[0].name, "peers": peers,
                   "peers_unavailable": {p: unavailable[p] for p in peer_lib.PEERS if p not in peers},
                   "video": video},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "rows": rows,
        "temporal": temporal,  # videos: mean PSNR between consecutive frames, per frame pair, per method
        "images": {"reference": ref_images, **{f"{meth.name}@{iv}": _images(engine, [g.latents for g in
                   results[(meth.name, iv)]]) for meth, iv in runs}},
    }


def _images(engine, latents: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per sample [C, H, W]: the unpacked latents (pixels for the bundled digits model)."""
    return [engine.family.unpack(x, engine.shapes)[0] for x in latents]


def _frames(images: list[torch.Tensor]) -> torch.Tensor:
    """Samples as a batch of images [N, C, H, W]; a video's frames count as images."""
    x = torch.stack(images)
    return x.transpose(1, 2).flatten(0, 1) if x.dim() == 5 else x


def _temporal(videos: list[torch.Tensor]) -> list[float]:
    """Temporal consistency: per consecutive frame pair, the PSNR between the two frames, averaged over
    the videos [C, F, H, W]. A cached method that flickers scores lower than the reference."""
    frames = videos[0].shape[1]
    return [statistics.mean(min(psnr(v[:, f + 1], v[:, f]), 99.0) for v in videos) for f in range(frames - 1)]


def _classifier():
    """An RBF SVM on scikit-learn's 8x8 digits (about 99% on held-out digits)."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    d = load_digits()
    return SVC(gamma=0.001, C=10).fit(d.data, d.target)


def _accuracy(classifier, images: list[torch.Tensor], labels: list[int]) -> float:
    import torch.nn.functional as F

    x = torch.stack(images)[:, :1].clamp(-1, 1)
    x = (F.avg_pool2d(x, 2) + 1) / 2 * 16  # back to the dataset's 8x8, 0..16 scale
    pred = classifier.predict(x.flatten(1).numpy())
    return float((pred == torch.tensor(labels).numpy()).mean())
