"""Issue 27 item 4, follow-up: does running the first K full-graph calls of a generation with dense attention (and
the rest sparse) recover the digits models' quality? (Training-free sparse attention for video DiTs keeps the early,
layout-setting steps dense.) Same engines as sparse_quality.py (`BuildOptions(attention=...)`); the sparse engine's full graph is swapped for the
dense engine's (same weights; the graph takes the bases as an input) on its first K calls. Experiment only.

    PYTHONPATH=. .venv/bin/python scripts/experiments/sparse_dense_first.py --model flux \\
        --attention sparse:tile=2x2,window=1 --dense-first 0,5,10,20
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import svdexport
from svdexport.bench.metrics import psnr
from svdexport.builder.build import BuildOptions, build
from svdexport.models import FAMILIES


class FirstDense:
    """The sampler's full graph: the dense one for the first `k` calls of a generation, then the sparse one."""

    def __init__(self, dense, sparse, k):
        self.dense, self.sparse, self.k, self.calls = dense, sparse, k, 0
        self.input_names, self.output_names = sparse.input_names, sparse.output_names

    def __call__(self, *args):
        self.calls += 1
        return (self.dense if self.calls <= self.k else self.sparse)(*args)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=("flux", "hunyuanvideo"), required=True)
    p.add_argument("--attention", required=True)
    p.add_argument("--dense-first", default="0,5,10,20")
    p.add_argument("--budget", type=int, default=9)
    p.add_argument("--seeds", default="2000-2015")
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    fam = FAMILIES[a.model]
    first, last = (int(s) for s in a.seeds.split("-"))
    t0, load0 = time.time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        opts = dict(model=a.model, weights="bundled:digits", dtype="fp32", backend="eager")
        build(BuildOptions(**opts), Path(tmp) / "dense", progress=False)
        dense = svdexport.load(Path(tmp) / "dense")
        build(BuildOptions(**opts, attention=a.attention), Path(tmp) / "sparse", progress=False)
        sparse = svdexport.load(Path(tmp) / "sparse")
        own_full, shapes, labels = sparse.sampler.full, dense.shapes, dense.labels
        rows = {}
        for seed in range(first, last + 1):
            x = dense.example_inputs(seed, None if labels is None else [seed % len(labels)] * shapes.batch)
            ref = fam.unpack(dense.generate(x, steps=50, interval=1).latents, shapes)
            for k in (int(v) for v in a.dense_first.split(",")):
                for what, kw in (("every step full", {"interval": 1}), (f"SVD-Cache {a.budget} of 50",
                                                                          {"full_steps": a.budget})):
                    sparse.sampler.full = FirstDense(dense.sampler.full, own_full, k)
                    img = fam.unpack(sparse.generate(x, steps=50, **kw).latents, shapes)
                    rows.setdefault(f"first {k} full-graph calls dense, {what}", []).append(min(psnr(img, ref), 99.0))
            sparse.sampler.full = own_full
    print(f"{a.model} bundled:digits, fp32 eager, --attention {sparse.manifest.attention.option}, seeds {first}-{last}, load {load0:.1f} -> "
          f"{os.getloadavg()[0]:.1f}, {time.time() - t0:.0f} s; PSNR against dense full compute")
    print("| variant | mean dB | worst dB |\n|---|---|---|")
    for name, v in rows.items():
        print(f"| {name} | {statistics.mean(v):.1f} | {min(v):.1f} |")


if __name__ == "__main__":
    main()
