"""Issue 27 item 4: what the sparse tile-window attention costs in quality on the trained digits models, on its own
(every step full) and stacked with SVD-Cache, as PSNR against fp32 dense full compute (and, for the stacked rows,
against the same sparse model's full compute: what the cache itself costs on top of the sparse attention).

Builds fp32 eager engines of the same weights with the default settings: dense, and one per sparse option (the
layout installed on the transformer before its graphs are made, so that calibration and every full step run the sparse
attention: what `build --attention sparse` would do). Until the builder takes the option, a sparse engine is made by
wrapping the family's `graphs` for the duration of its build and load (this script only). Eagerly the sparse
processors run the mask dense through SDPA (tests/test_sparse_attention.py holds it to FlexAttention).

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
import types
import warnings
from pathlib import Path

import torch

import svdexport
from svdexport.bench.metrics import psnr
from svdexport.builder.build import BuildOptions, build
from svdexport.models import FAMILIES
from svdexport.models.sparse_attention import parse_attention
from svdexport.models.sparse_processor import install, layout_for


class SparseGraphs:
    """While active, the family's graphs are made over a transformer with the sparse layout installed."""

    def __init__(self, fam, spec, shapes):
        self.fam, self.spec, self.shapes, self.layout = fam, spec, shapes, None

    def __enter__(self):
        own = type(self.fam).graphs

        def graphs(fam, transformer, granularity):
            self.layout = layout_for(fam.name, self.shapes, self.spec)
            install(transformer, self.layout)
            return own(fam, transformer, granularity)

        self.fam.graphs = types.MethodType(graphs, self.fam)
        return self

    def __exit__(self, *exc):
        del self.fam.graphs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=("flux", "hunyuanvideo"), required=True)
    p.add_argument("--weights", default="bundled:digits")
    p.add_argument("--attention", required=True, help="sparse options, ';'-separated")
    p.add_argument("--budgets", default="9", help="full steps of 50 for the SVD-Cache rows")
    p.add_argument("--seeds", default="2000-2015")
    p.add_argument("--steps", type=int, default=50)
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    fam = FAMILIES[a.model]
    first, last = (int(s) for s in a.seeds.split("-"))
    seeds = range(first, last + 1)
    budgets = [int(b) for b in a.budgets.split(",")]
    load0, t0 = os.getloadavg()[0], time.time()
    opts = BuildOptions(model=a.model, weights=a.weights, dtype="fp32", backend="eager")
    with tempfile.TemporaryDirectory() as tmp:
        build(opts, Path(tmp) / "dense", progress=False)
        dense = svdexport.load(Path(tmp) / "dense")
        shapes, labels = dense.shapes, dense.labels
        sparse, layouts = {}, {}
        for i, option in enumerate(a.attention.split(";")):
            spec = parse_attention(option, 3 if a.model == "hunyuanvideo" else 2)
            with SparseGraphs(fam, spec, shapes) as sg:
                build(BuildOptions(model=a.model, weights=a.weights, dtype="fp32", backend="eager"),
                      Path(tmp) / f"sparse{i}", progress=False)
                sparse[spec.text()] = svdexport.load(Path(tmp) / f"sparse{i}")
                sparse[spec.text()].generate(seed=first, steps=2, interval=1)  # makes the graphs (and the layout)
            layouts[spec.text()] = sg.layout
        print(f"built the engines in {time.time() - t0:.0f} s", flush=True)
        rows: dict[str, list[float]] = {}

        def image(engine, x, **kw):
            return fam.unpack(engine.generate(x, steps=a.steps, **kw).latents, shapes).float()

        def add(name, img, ref):
            rows.setdefault(name, []).append(min(psnr(img, ref), 99.0))

        for seed in seeds:
            x = dense.example_inputs(seed, None if labels is None else [seed % len(labels)] * shapes.batch)
            ref = image(dense, x, interval=1)
            for b in budgets:
                add(f"dense, SVD-Cache {b} of {a.steps} | vs dense full", image(dense, x, full_steps=b), ref)
            for name, engine in sparse.items():
                own = image(engine, x, interval=1)
                add(f"{name}, every step full | vs dense full", own, ref)
                for b in budgets:
                    cached = image(engine, x, full_steps=b)
                    add(f"{name}, SVD-Cache {b} of {a.steps} | vs dense full", cached, ref)
                    add(f"{name}, SVD-Cache {b} of {a.steps} | vs its own full", cached, own)
            print(f"seed {seed} done ({time.time() - t0:.0f} s)", flush=True)
    print(f"{a.model} {a.weights}, fp32 eager engines, shapes {shapes.to_dict()}, seeds {first}-{last}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; load {load0:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end; {time.time() - t0:.0f} s")
    for name, lay in layouts.items():
        image_only = lay.dense()[0][~lay.is_text][:, ~lay.is_text].float().mean().item()
        print(f"- {name}: token grid {'x'.join(map(str, lay.grid))} + {lay.text_len} text; the mask keeps "
              f"{lay.kept:.1%} of all (query, key) pairs, {image_only:.1%} of the image-image pairs")
    print("| variant | against | mean dB | worst dB |")
    print("|---|---|---|---|")
    for name, v in rows.items():
        what, against = name.split(" | ")
        print(f"| {what} | {against} | {statistics.mean(v):.1f} | {min(v):.1f} |")


if __name__ == "__main__":
    main()
