"""Issue 27 item 4: what the sparse tile-window attention costs in quality on the trained digits models, on its own
(every step full) and stacked with SVD-Cache, as PSNR against fp32 dense full compute (and, for the stacked rows,
against the same sparse engine's full compute: what the cache itself costs on top of the sparse attention), per seed,
paired: the stacked rows also give the per-seed difference to dense SVD-Cache at the same budget.

Builds fp32 engines of the same weights with the product path (`BuildOptions(attention=...)`, what `svdexport build
--attention ...` does: the layout installed before the graphs are made, so calibration, the plans and every full
step run the sparse attention): dense, and one per sparse option. Eager by default (the mask runs dense through
SDPA; tests/test_sparse_attention.py and tests/test_sparse_build.py hold it to the compiled FlexAttention kernel);
`--backend aoti` builds the compiled engines instead. Seeds are held out: calibration uses seeds from 1,000,000.

    PYTHONPATH=. .venv/bin/python scripts/experiments/sparse_quality.py --model flux \\
        --attention "sparse:tile=2x2,window=1;sparse:tile=4x4,window=0"
    PYTHONPATH=. .venv/bin/python scripts/experiments/sparse_quality.py --model hunyuanvideo \\
        --attention "sparse:tile=1x2x2,window=1" --budgets 9,17
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import svdexport
from svdexport.bench.metrics import psnr
from svdexport.builder.build import BuildOptions, build
from svdexport.hardware import describe_cpu
from svdexport.models import FAMILIES
from svdexport.models.sparse_attention import parse_attention
from svdexport.models.sparse_processor import AXES, layout_for


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=("flux", "hunyuanvideo"), required=True)
    p.add_argument("--weights", default="bundled:digits")
    p.add_argument("--attention", required=True, help="sparse options, ';'-separated")
    p.add_argument("--budgets", default="9", help="full steps of 50 for the SVD-Cache rows")
    p.add_argument("--seeds", default="2000-2015")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--backend", default="eager", choices=("eager", "aoti"))
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    fam = FAMILIES[a.model]
    first, last = (int(s) for s in a.seeds.split("-"))
    seeds = range(first, last + 1)
    budgets = [int(b) for b in a.budgets.split(",")]
    load0, t0 = os.getloadavg()[0], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        engines = {}
        for i, option in enumerate(["dense", *a.attention.split(";")]):
            opts = BuildOptions(model=a.model, weights=a.weights, dtype="fp32", backend=a.backend, attention=option)
            manifest, _ = build(opts, Path(tmp) / f"e{i}", graphs_dir=Path(tmp) / f"g{i}", progress=False)
            engines[opts.attention] = svdexport.load(Path(tmp) / f"e{i}")
        dense = engines.pop("dense")
        shapes, labels = dense.shapes, dense.labels
        print(f"built the engines in {time.time() - t0:.0f} s", flush=True)
        rows: dict[str, list[float]] = {}

        def image(engine, x, **kw):
            return fam.unpack(engine.generate(x, steps=a.steps, **kw).latents, shapes).float()

        def add(name, value):
            rows.setdefault(name, []).append(value)

        for seed in seeds:
            x = dense.example_inputs(seed, None if labels is None else [seed % len(labels)] * shapes.batch)
            ref = image(dense, x, interval=1)
            cached_dense = {}
            for b in budgets:
                cached_dense[b] = min(psnr(image(dense, x, full_steps=b), ref), 99.0)
                add(f"dense, SVD-Cache {b} of {a.steps} | vs dense full", cached_dense[b])
            for name, engine in engines.items():
                own = image(engine, x, interval=1)
                add(f"{name}, every step full | vs dense full", min(psnr(own, ref), 99.0))
                for b in budgets:
                    cached = image(engine, x, full_steps=b)
                    vs_dense = min(psnr(cached, ref), 99.0)
                    add(f"{name}, SVD-Cache {b} of {a.steps} | vs dense full", vs_dense)
                    add(f"{name}, SVD-Cache {b} of {a.steps} | paired: minus dense SVD-Cache {b}",
                        vs_dense - cached_dense[b])
                    add(f"{name}, SVD-Cache {b} of {a.steps} | vs its own full", min(psnr(cached, own), 99.0))
            print(f"seed {seed} done ({time.time() - t0:.0f} s)", flush=True)
    print(f"{a.model} {a.weights}, fp32 {a.backend} engines (svdexport build --attention), shapes "
          f"{shapes.to_dict()}, held-out seeds {first}-{last} (calibration: seeds from 1,000,000); torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, CPU: {describe_cpu()}; load {load0:.1f} at the "
          f"start, {os.getloadavg()[0]:.1f} at the end; {time.time() - t0:.0f} s")
    for name, engine in engines.items():
        rec, lay = engine.manifest.attention, layout_for(a.model, shapes, parse_attention(name, AXES[a.model]))
        image_only = lay.dense()[0][~lay.is_text][:, ~lay.is_text].float().mean().item()
        print(f"- {name}: token grid {'x'.join(map(str, rec.grid))} + {rec.text_tokens} text; the mask keeps "
              f"{rec.kept:.1%} of all (query, key) pairs, {image_only:.1%} of the image-image pairs; blocks "
              f"computed {rec.blocks_computed:.1%} (tile of {lay.block} tokens)")
    print("| variant | against | mean dB | worst dB |")
    print("|---|---|---|---|")
    for name, v in rows.items():
        what, against = name.split(" | ")
        print(f"| {what} | {against} | {statistics.mean(v):.1f} | {min(v):.1f} |")


if __name__ == "__main__":
    main()
