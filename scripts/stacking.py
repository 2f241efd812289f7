"""docs/stacking.md (issue 27, item 5): SVD-Cache stacked with int8 and with sparse attention, every engine built by
the product path (`builder.build`, what `svdexport build --backend aoti [--dtype bf16 | --quantize int8]
[--attention sparse:...]` does) and run by the runtime (`svdexport.load`, `Engine.generate`).

- Quality, per trained digits model (FLUX and HunyuanVideo `bundled:digits`): the 8 cells {dense, sparse} x
  {bf16, int8} x {every step full, SVD-Cache at BUDGET of STEPS full steps}, PSNR of the final latents against
  fp32 dense full compute (an fp32 eager engine, every step full), per seed, then mean and worst; paired: the
  per-seed difference to the dense bf16 SVD-Cache cell. Every engine sees the same noise (rounded to bf16).
- Speed at FLUX.1 width (`bundled:flux1-reduced`): full and cached step of the four aoti engines, loaded side by
  side in one process, interleaved rounds (order rotated), medians; the bf16 matmul peak measured in the same
  rounds; 50-step times derived from the step times.

Each section writes its results to WORK/results/SECTION.json; the document is rendered from every section's
results present, so a section can be measured again alone (`--sections`). Engines are kept in WORK and reused
when their build key matches (delete WORK to rebuild them).

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python scripts/stacking.py            # docs/stacking.md
    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python scripts/stacking.py --quick    # tiny settings: a smoke test
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

import svdexport
from svdexport import hardware
from svdexport.bench.latency import engine_gemm_path, graph_call, step_state
from svdexport.bench.metrics import psnr
from svdexport.bench.roofline import count_flops
from svdexport.bench.stacking import GEN_FULL, GEN_STEPS, VARIANTS, now, render
from svdexport.builder.build import BuildOptions, build
from svdexport.errors import SvdExportError
from svdexport.files import atomic_file
from svdexport.models import FAMILIES
from svdexport.models.sparse_attention import parse_attention
from svdexport.models.sparse_processor import AXES, layout_for
from svdexport.runtime.base import skeleton_graphs


@dataclass
class Settings:
    seeds: range = range(5000, 5016)  # the project's held-out set (docs/heldout.md)
    steps: int = 50
    budget: int = 9
    # Tiles keeping about the fraction the defaults keep at the real sizes (docs/sparse.md's quality section):
    # FLUX 2x2 w1 on the 8x8 grid keeps 39% of image pairs (8x16 w1 at 1024x1024: 38%); HunyuanVideo 1x2x2 w1 on
    # 3x6x6 keeps 47% (2x8x8 w1 at 8x32x32: 29%; the tighter 0x1x1 window keeps 20%).
    quality: dict = field(default_factory=lambda: {"flux": "sparse:tile=2x2,window=1",
                                                   "hunyuanvideo": "sparse:tile=1x2x2,window=1"})
    quality_calib: dict = field(default_factory=dict)  # the product's defaults (8 samples, the model's steps)
    # (height, text_len, sparse option, rounds): 256x256 text 64 is the int8 gate's shape, where the default tile
    # 8x16 keeps every block of the 16x16 grid (refused), so 4x4 w1 (39% of image pairs, 16-token blocks).
    speed: list = field(default_factory=lambda: [(256, 64, "sparse:tile=4x4,window=1", 7),
                                                 (1024, 512, "sparse", 3)])
    speed_weights: str = "bundled:flux1-reduced"
    speed_calib: dict = field(default_factory=lambda: {"calib_samples": 1, "calib_steps": 2})  # speed only
    cached_calls: int = 5  # cached-step calls per timing (a cached step is milliseconds)
    e2e_up_to: int = 256  # heights whose 50-step generations are also measured end to end (seconds there)


QUICK = Settings(seeds=range(5000, 5002), steps=10, budget=4, quality_calib={"calib_samples": 1, "calib_steps": 4},
                 speed=[(128, 8, "sparse:tile=2x2,window=1", 2)], speed_weights="bundled:digits",
                 speed_calib={"calib_samples": 1, "calib_steps": 4})


def engine(work: Path, model: str, weights: str, attention: str, precision: str, shapes: dict, calib: dict):
    """The folder of the engine `svdexport build --backend aoti` makes of these options (bf16: --dtype bf16; int8:
    --quantize int8, which quantizes the fp32 model), built once into WORK and reused while its build key matches;
    and its build record (the seconds of the run that built it; whether this run reused it). Not loaded here: a
    build's memory check counts what this process holds."""
    kw = {"bf16": {"dtype": "bf16"}, "int8": {"quantize": "int8"}, "fp32": {"dtype": "fp32"}}[precision]
    backend = "eager" if precision == "fp32" else "aoti"
    opts = BuildOptions(model=model, weights=weights, backend=backend, attention=attention, shapes=dict(shapes),
                        **calib, **kw)
    tag = "-".join([model, weights.replace("bundled:", ""), "x".join(map(str, shapes.values())) or "default",
                    attention.replace(":", "_").replace(",", "_").replace("=", ""), precision, backend,
                    "_".join(f"{v}" for v in calib.values()) or "calib-default"])
    start = time.perf_counter()
    _, reused = build(opts, work / "engines" / tag, graphs_dir=work / "graphs" / tag, progress=False)
    seconds = round(time.perf_counter() - start)
    print(f"  {tag}: {'reused' if reused else f'built in {seconds} s'}", flush=True)
    times = work / "build_seconds.json"  # what each engine's build took, for the runs that reuse it
    known = json.loads(times.read_text()) if times.exists() else {}
    if not reused or tag not in known:
        known[tag] = seconds if not reused else None
        with atomic_file(times) as tmp:
            tmp.write_text(json.dumps(known, indent=1))
    return work / "engines" / tag, {"seconds": known[tag], "reused": reused}


def image_pairs_kept(model: str, shapes, option: str) -> float:
    lay = layout_for(model, shapes, parse_attention(option, AXES[model]))
    return lay.dense()[0][~lay.is_text][:, ~lay.is_text].float().mean().item()


def quality(model: str, s: Settings, work: Path) -> dict:
    t0, load0 = time.time(), os.getloadavg()[0]
    option, builds = s.quality[model], {}
    ref, builds["fp32 dense eager (reference)"] = engine(work, model, "bundled:digits", "dense", "fp32", {},
                                                         s.quality_calib)
    engines = {}
    for a, p in VARIANTS:
        engines[f"{a}-{p}"], builds[f"{a} {p}"] = engine(work, model, "bundled:digits", a if a == "dense" else option,
                                                         p, {}, s.quality_calib)
    ref, engines = svdexport.load(ref), {k: svdexport.load(f) for k, f in engines.items()}
    fam, shapes, labels = ref.family, ref.shapes, ref.labels
    psnrs: dict[str, list[float]] = {}
    own: dict[str, list[float]] = {}  # SVD-Cache against the same engine's every-step-full output: the cache's cost

    def add(key: str, gen, target) -> torch.Tensor:
        img = fam.unpack(gen.latents.float(), shapes)
        psnrs.setdefault(key, []).append(min(psnr(img, target), 99.0))
        return img

    for seed in s.seeds:
        x = ref.example_inputs(seed, None if labels is None else [seed % len(labels)] * shapes.batch)
        x16 = {k: v.bfloat16() if v.is_floating_point() else v for k, v in x.items()}
        x32 = {k: v.float() if v.is_floating_point() else v for k, v in x16.items()}  # the same noise for all
        target = fam.unpack(ref.generate(x32, steps=s.steps, interval=1).latents.float(), shapes)
        add("fp32-dense-cache", ref.generate(x32, steps=s.steps, full_steps=s.budget), target)
        for name, e in engines.items():
            xin = x16 if e.dtype == torch.bfloat16 else x32
            full = add(f"{name}-full", e.generate(xin, steps=s.steps, interval=1), target)
            cached = add(f"{name}-cache", e.generate(xin, steps=s.steps, full_steps=s.budget), target)
            own.setdefault(f"{name}-cache", []).append(min(psnr(cached, full), 99.0))
        print(f"  {model} seed {seed} done ({time.time() - t0:.0f} s)", flush=True)
    sparse_rec = engines["sparse-bf16"].manifest.attention
    for e in [ref, *engines.values()]:
        e.close()
    return {"date": now(), "model": model, "weights": "bundled:digits", "shapes": shapes.to_dict(),
            "sparse": sparse_rec.option,
            "image_pairs_kept": image_pairs_kept(model, shapes, sparse_rec.option),
            "blocks_computed": sparse_rec.blocks_computed, "seeds": [s.seeds.start, s.seeds.stop - 1],
            "steps": s.steps, "budget": s.budget, "psnr": psnrs, "psnr_own": own, "build_s": builds,
            "calibration": s.quality_calib or "the product's defaults", "seconds": round(time.time() - t0),
            "load": [load0, os.getloadavg()[0]], "threads": torch.get_num_threads()}


def dense_flops(e, state: dict) -> int:
    """FLOPs of the dense full step, counted on the meta device (torch's counter: matmuls and attention)."""
    full, _ = skeleton_graphs(e.manifest)
    meta = [state[n].to(e.dtype if state[n].is_floating_point() else state[n].dtype).to("meta")
            for n in full.input_names]
    return count_flops(full, meta)


def attention_call(e, dtype: str) -> float:
    """Seconds of one dense SDPA call at the engine's tokens and head layout in `dtype` (PyTorch's CPU kernel, what
    the dense engines call): int8 engines run attention in fp32 (PT2E's x86 flow), bf16 engines in bf16."""
    shape = (e.shapes.batch, e.config["num_attention_heads"], e.shapes.img_tokens + e.shapes.text_len,
             e.config["attention_head_dim"])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g).to(getattr(torch, dtype)) for _ in range(3))
    torch.nn.functional.scaled_dot_product_attention(q, k, v)  # warm-up
    start = time.perf_counter()
    torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return time.perf_counter() - start


@torch.inference_mode()
def speed(height: int, text_len: int, option: str, rounds: int, s: Settings, work: Path) -> dict:
    t0, load0 = time.time(), os.getloadavg()[0]
    shapes = {"height": height, "width": height, "text_len": text_len}
    engines, builds = {}, {}
    for a, p in VARIANTS:  # built one at a time (an int8 build at FLUX.1 width peaks near 8 GiB), then loaded
        engines[f"{a}-{p}"], builds[f"{a} {p}"] = engine(work, "flux", s.speed_weights, a if a == "dense" else option,
                                                         p, shapes, s.speed_calib)
    engines = {k: svdexport.load(f) for k, f in engines.items()}
    calls, states = {}, {}
    for name, e in engines.items():
        states[name] = step_state(e, e)  # one mid-schedule step; C and R from the engine's own full step
        for kind, graph in (("full", e.full), ("cached", e.cached)):
            calls[(name, kind)] = graph_call(graph, states[name], e.manifest.graphs[kind].input_dtypes)
            calls[(name, kind)]()  # warm-up
    flops = dense_flops(engines["dense-bf16"], states["dense-bf16"])
    times = {f"{n}/{k}": [] for n, k in calls}
    peaks = []
    mm = hardware.flux_shapes(engines["dense-bf16"].shapes.img_tokens + text_len,
                              FAMILIES["flux"].hidden_size(engines["dense-bf16"].config), "cpu")
    order = list(calls)
    attention = {"bfloat16": [], "float32": []}  # one dense attention call: what fp32 between the linears pays
    for r in range(rounds):
        for key in order[2 * r % len(order):] + order[:2 * r % len(order)]:  # rotated: no variant always first
            n = 1 if key[1] == "full" else s.cached_calls
            start = time.perf_counter()
            for _ in range(n):
                calls[key]()
            times[f"{key[0]}/{key[1]}"].append((time.perf_counter() - start) / n)
        peaks.append(hardware.matmul_peak(torch.bfloat16, "cpu", mm, 3).flops_per_s)
        for dtype, ts in attention.items():
            ts.append(attention_call(engines["dense-bf16"], dtype))
        print(f"  {height}x{height} round {r}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()),
              flush=True)
    e2e = {}
    if height <= s.e2e_up_to:  # the derivation checked: one whole generation per engine and schedule
        for name, e in engines.items():
            x = e.example_inputs(0)
            for schedule, kw in (("full", {"interval": 1}), ("cache", {"full_steps": GEN_FULL})):
                g = e.generate(x, steps=GEN_STEPS, **kw)
                e2e[f"{name}/{schedule}"] = {"seconds": g.seconds, "full_steps": g.full_steps}
        print(f"  {height}x{height} end to end: " + ", ".join(f"{k} {v['seconds']:.2f} s" for k, v in e2e.items()),
              flush=True)
    sparse_rec = engines["sparse-bf16"].manifest.attention
    fam_shapes = engines["dense-bf16"].shapes
    gemm = {n: engine_gemm_path(e) for n, e in engines.items()}
    for e in engines.values():
        e.close()
    return {"date": now(), "weights": s.speed_weights, "shapes": fam_shapes.to_dict(), "sparse": sparse_rec.option,
            "image_pairs_kept": image_pairs_kept("flux", fam_shapes, sparse_rec.option),
            "blocks_computed": sparse_rec.blocks_computed, "block_tokens": int(math.prod(sparse_rec.tile)),
            "hidden": FAMILIES["flux"].hidden_size(engines["dense-bf16"].config), "calibration": s.speed_calib,
            "times": times, "peaks": peaks, "attention_call": attention, "dense_flops": flops, "e2e": e2e,
            "attention_calls": sum(engines["dense-bf16"].config[k] for k in ("num_layers", "num_single_layers")),
            "rounds": rounds, "cached_calls": s.cached_calls,
            "gemm": gemm, "build_s": builds,
            "seconds": round(time.time() - t0), "load": [load0, os.getloadavg()[0]],
            "threads": torch.get_num_threads()}


def main() -> None:
    try:
        run()
    except SvdExportError as e:  # a refused build (memory, options): one line, as the CLI says it
        raise SystemExit(f"stacking.py: error: {e}") from None


def run() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke test; the numbers mean nothing)")
    p.add_argument("--work", default="/tmp/svdexport-stacking", help="engines and per-section results")
    p.add_argument("--out", default=None, help="default: docs/stacking.md (--quick: WORK/stacking-quick.md)")
    p.add_argument("--sections", default="all", help="comma-separated: quality-flux, quality-hunyuanvideo, "
                   "speed-HEIGHT (e.g. speed-256); all (default); none (render only)")
    p.add_argument("--seeds", default=None, help="FIRST-LAST (default 5000-5015; --quick 5000-5001)")
    p.add_argument("--not-measured", action="append", default=[], help="a line for the document's last section")
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    s = QUICK if a.quick else Settings()
    if a.seeds:
        try:
            first, last = (int(x) for x in a.seeds.split("-"))
        except ValueError:
            raise SystemExit(f"stacking.py: error: --seeds takes FIRST-LAST, got {a.seeds!r}") from None
        s.seeds = range(first, last + 1)
    command = "PYTHONPATH=. OMP_NUM_THREADS={} .venv/bin/python scripts/stacking.py {}".format(
        os.environ.get("OMP_NUM_THREADS", "unset"), shlex.join(sys.argv[1:])).strip()
    work = Path(a.work) / ("quick" if a.quick else "full")
    out = Path(a.out) if a.out else (work / "stacking-quick.md" if a.quick else Path("docs/stacking.md"))
    all_sections = [f"quality-{m}" for m in s.quality] + [f"speed-{h}" for h, *_ in s.speed]
    chosen = all_sections if a.sections == "all" else [] if a.sections == "none" else a.sections.split(",")
    unknown = set(chosen) - set(all_sections)
    if unknown:
        raise SystemExit(f"stacking.py: error: unknown section(s) {sorted(unknown)} (choose from {all_sections})")
    (work / "results").mkdir(parents=True, exist_ok=True)
    for name in chosen:
        t = time.time()
        print(f"{name} ...", flush=True)
        if name.startswith("quality-"):
            r = quality(name.removeprefix("quality-"), s, work)
        else:
            h, text, option, rounds = next(x for x in s.speed if f"speed-{x[0]}" == name)
            r = speed(h, text, option, rounds, s, work)
        r["command"] = command
        with atomic_file(work / "results" / f"{name}.json") as tmp:
            tmp.write_text(json.dumps(r, indent=1))
        print(f"{name}: {time.time() - t:.0f} s", flush=True)
    results = {"env": {"date": now(), "cpu": hardware.describe_cpu(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS", "unset")},
               "not_measured": list(a.not_measured)}
    for name in all_sections:
        f = work / "results" / f"{name}.json"
        if f.exists():
            results[name] = json.loads(f.read_text())
        else:
            results["not_measured"].insert(0, f"{name}: not run in this document's runs.")
    # The commands that measured the sections (the first run's default, for results written before they said)
    measured = dict.fromkeys(r.get("command", "PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python scripts/stacking.py")
                             for k, r in results.items() if k.startswith(("quality-", "speed-")))
    if measured and list(measured) != [command]:
        command = " ; ".join(measured) + f" (rendered by: {command})"
    with atomic_file(out) as tmp:
        tmp.write_text(render(results, command, a.quick))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
