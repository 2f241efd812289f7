"""`svdexport compare ENGINE`: the same seeds and classes through eager full compute (the reference), every
predictor of the project, TaylorSeer on the whole feature, the compiled engine and the peer libraries, each
at the same budgets of full steps (`bench/methods.py` says how each method reaches a budget).

Everything runs in one process and interleaved: for each sample, every method runs once, so a drift of
the machine hits all methods alike. Speedups are against eager full compute measured in that same loop.
Per method and budget: PSNR mean and worst sample, and paired statistics against the SVD-Cache engine
with its own plan at the same budget (`bench/stats.py`); each calibrated row names the forecast its plan was
searched for, and a method run on several plans has its best one marked (`mark_best_plans`).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from svdexport.bench import methods as methods_lib
from svdexport.bench.methods import PREDICTOR_VARIANTS, Method, Setup  # noqa: F401 (the rows' building blocks)
from svdexport.bench.metrics import psnr, rel_l2, ssim
from svdexport.bench.stats import PSNR_CAP, paired, summary
from svdexport.bench.sweep import SWEEP_SEEDS
from svdexport.cache.plan import StepPlan
from svdexport.runtime.scheduler import Generation


def _methods(setup: Setup, peers: list[str]) -> list[Method]:
    """Every row's method: eager full compute first (the reference), then the project's, then the peers."""
    return methods_lib.project_methods(setup) + methods_lib.peer_methods(setup, peers)


def budgets_of(steps: int, warmup: int, full_steps=(), intervals=()) -> list[int]:
    """The budgets (full steps) to compare: those given, plus the full steps of the uniform plan of each
    interval (with the engine's warmup)."""
    out = set(full_steps) | {len(StepPlan.uniform(steps, warmup, iv).full_steps) for iv in intervals}
    return sorted(b for b in out if 1 <= b <= steps)


def _precision_reference(engine, methods: list[Method], steps: int) -> list[Method]:
    """An engine not in float32 is compared with float32 full compute (the reference, first row); its own
    dtype's full compute stays as a row, so the precision loss alone is visible beside the cache's."""
    if engine.dtype == torch.float32:
        return methods
    twin = engine.eager_reference(torch.float32)
    dtype = {"bfloat16": "bf16", "float16": "fp16"}.get(engine.manifest.dtype, engine.manifest.dtype)

    def fp32(x: dict) -> dict:  # the same (rounded) inputs, so only the compute's precision differs
        return {k: v.float() if v.is_floating_point() else v for k, v in x.items()}

    reference = dataclasses.replace(methods[0], name="eager fp32 full compute",
                                    run=lambda x, b: twin.generate(fp32(x), steps=steps, interval=1))
    return [reference, dataclasses.replace(methods[0], name=f"eager {dtype} full compute")] + methods[1:]


def compare(engine_dir: str, samples: int = 16, steps: int = 50, budgets: tuple[int, ...] | None = None,
            peers: list[str] | None = None, progress: bool = True, seeds: list[int] | None = None,
            intervals: tuple[int, ...] = ()) -> dict:
    """Every method at every budget of full steps on the same samples (seeds 0..samples-1, or `seeds`).
    `budgets` default: the engine's plan's count at `steps` (and the uniform budgets of `intervals`)."""
    import svdexport
    from svdexport.bench import peers as peer_lib

    engine = svdexport.load(engine_dir)
    m = engine.manifest
    eager = engine.eager_reference()
    setup = Setup(engine, eager, steps)
    budgets = budgets_of(steps, setup.warmup, budgets or (), intervals)
    if not budgets:
        budgets = [len(engine.plan(steps).full_steps)]
    unavailable = {p: peer_lib.available(p, engine.family) for p in peer_lib.PEERS}
    peers = [p for p in (peer_lib.PEERS if peers is None else peers) if unavailable[p] is None]
    methods = _precision_reference(engine, _methods(setup, peers), steps)
    seeds = list(range(samples)) if seeds is None else list(seeds)
    labels = [seed % len(engine.labels) for seed in seeds] if engine.labels else None
    inputs = [engine.example_inputs(seed, None if labels is None else [labels[k]] * engine.shapes.batch)
              for k, seed in enumerate(seeds)]
    machine = _machine()
    runs = [(meth, steps if meth.uncached else b) for meth in methods for b in ((steps,) if meth.uncached else budgets)]
    with torch.inference_mode():
        # Settings first: threshold peers sweep their thresholds here, on inputs that are not measured.
        settings = {(meth.name, b): meth.settings(b)
                    for meth, b in tqdm(runs, desc="settings and threshold sweeps", disable=not progress)}
        results: dict[tuple[str, int], list[Generation]] = {(meth.name, b): [] for meth, b in runs}
        methods[0].run(inputs[0], steps)  # warm-up: one-time costs stay out of the timings
        for x in tqdm(inputs, desc="comparing", unit="sample", disable=not progress):
            for meth, b in runs:  # interleaved: every method once per sample
                results[(meth.name, b)].append(meth.run(x, b))
    reference = results[(methods[0].name, steps)]
    images = {key: _images(engine, [g.latents for g in gens]) for key, gens in results.items()}
    ref_images = images[(methods[0].name, steps)]
    ref_latency = statistics.mean(g.seconds for g in reference)
    video = ref_images[0].dim() == 4  # [C, F, H, W] per sample
    # The digit classifier reads still 16x16 digits; the video model's moving clips are classified frame by
    # frame in tests/test_reference_video.py instead, so videos get no class column.
    classifier = _classifier() if labels is not None and not video else None
    temporal = {"reference": _temporal(ref_images)} if video else {}
    # SVD-Cache with the engine's own plan and forecast: the paired statistics' reference.
    default = next(meth.name for meth in methods if not meth.uncached)
    per_sample = {key: [min(psnr(a, b), PSNR_CAP) for a, b in zip(imgs, ref_images)] for key, imgs in images.items()}
    rows = []
    for meth, b in runs:
        gens, imgs, psnrs = results[(meth.name, b)], images[(meth.name, b)], per_sample[(meth.name, b)]
        latency = statistics.mean(g.seconds for g in gens)
        full = [g.full_steps for g in gens]
        p = summary(psnrs)
        rows.append({
            "method": meth.name, "backend": meth.backend, "reference": meth.uncached, "peer": meth.peer,
            "budget": b, "plan_kind": meth.plan_kind, "plan": meth.steps_of(b), "plan_search": meth.search(b),
            "base_method": meth.base, "best_plan": None, "settings": settings[(meth.name, b)],
            "full_steps": full[0] if len(set(full)) == 1 else statistics.mean(full),
            "full_steps_min": min(full), "full_steps_max": max(full), "full_steps_per_sample": full,
            "total_steps": steps, "latency_s": latency, "speedup": ref_latency / latency,
            "psnr_db": p["mean"], "psnr_worst_db": p["worst"], "psnr_std_db": p["std"], "psnr_per_sample": psnrs,
            "paired": None if meth.uncached else dict(paired(psnrs, per_sample[(default, b)]), against=default),
            "ssim": ssim(_frames(imgs), _frames(ref_images)),
            "rel_l2": statistics.mean(rel_l2(g.latents, r.latents) for g, r in zip(gens, reference)),
            "class_acc": None if classifier is None else _accuracy(classifier, imgs, labels),
            "temporal_psnr_db": None,
        })
        if video:
            temporal[f"{meth.name}@{b}"] = curve = _temporal(imgs)
            rows[-1]["temporal_psnr_db"] = statistics.mean(curve)
    mark_best_plans(rows)
    return {
        "config": {"engine": str(engine_dir), "backend": m.backend, "model": m.model.weights.source,
                   "steps": steps, "samples": len(seeds), "seeds": seeds, "budgets": budgets,
                   "engine_plan": engine.plan(steps).full_steps, "cache": m.cache.to_dict(),
                   "shapes": m.shapes.build, "dtype": m.dtype, "reference": methods[0].name, "peers": peers,
                   "peers_unavailable": {p: unavailable[p] for p in peer_lib.PEERS if p not in peers},
                   "paired_against": default, "sweep_seeds": list(SWEEP_SEEDS), "video": video},
        "machine": {**machine, "load_average_end": os.getloadavg()[0]},
        "rows": rows,
        "temporal": temporal,  # videos: mean PSNR between consecutive frames, per frame pair, per method
        "images": {"reference": ref_images, **{f"{name}@{b}": imgs for (name, b), imgs in images.items()}},
    }


def mark_best_plans(rows: list[dict]) -> None:
    """A method run on several plans (`base_method`): at each budget its row of the highest mean PSNR gets
    best_plan True, the others False (ties: the first row); a method on one plan keeps None."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        if not r["reference"]:
            groups.setdefault((r["base_method"], r["budget"]), []).append(r)
    for group in groups.values():
        if len(group) > 1:
            best = max(group, key=lambda r: r["psnr_db"])
            for r in group:
                r["best_plan"] = r is best


def _machine() -> dict:
    """Where the run is measured: timings depend on the CPU and on what else runs (the load average over the
    last minute, at the start; `compare` adds the one at the end); PSNRs do not."""
    from svdexport import hardware

    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
    except OSError:
        names = []
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": names[0] if names else platform.processor(),
            "cores": os.cpu_count(), "bf16_units": hardware.cpu_bf16()[1], "load_average_start": os.getloadavg()[0]}


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
