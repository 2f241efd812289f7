"""Issue 27, item 2's quality gate: int8 SVD-Cache against bf16 SVD-Cache, both against fp32 full compute, on a
trained digits model at 9 of 50 full steps (the gate: int8 no further from fp32 than bf16, within 0.5 dB).

Engines (built here, or reused from ROOT): an fp32 engine (its bases and plans: an int8 build calibrates in fp32
and quantizes at export) and a bf16 aoti engine (`--dtype bf16`, its own bf16 calibration, as `build --dtype
bf16` makes it). The int8 engine is the fp32 engine with both graphs quantized by PT2E (X86InductorQuantizer,
dynamic per-tensor activations, per-channel weights) and compiled by AOTInductor with freezing, their constants
bound at load (scripts/experiments/int8_flux1_step.py's `aoti`). Every engine runs the same inputs (the bf16
engine's, rounded to bf16, as `svdexport compare` gives a bf16 engine and its fp32 reference).

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/experiments/int8_quality.py [--model hunyuanvideo] \\
        [--seeds 2000-2015] [--variants int8-all,int8-kept,int8-built]

int8-built: the engine `svdexport build --backend aoti --quantize int8` makes (builder/quantized.py).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import svdexport
from svdexport.bench.metrics import psnr
try:  # the build's module, before and after the package's restructuring
    from svdexport.builder.build import BuildOptions, build
except ImportError:
    from svdexport.build.builder import BuildOptions, build
from svdexport.export import quantize as qz
from svdexport.runtime.base import eager_graphs

sys.path.insert(0, str(Path(__file__).parent))
from int8_flux1_step import aoti  # noqa: E402

warnings.filterwarnings("ignore")


class Graph:
    """A compiled package with the eager graphs' calling convention (what StepCache calls)."""

    def __init__(self, fn, input_names, output_names):
        self.fn, self.input_names, self.output_names = fn, list(input_names), list(output_names)

    def __call__(self, *inputs):
        out = self.fn(*[t.contiguous() for t in inputs])
        out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        return out if len(self.output_names) > 1 else out[0]


def engine(root: Path, model: str, dtype: str, backend: str, quantize: str = "none"):
    """A CLI-equivalent build (`build --quantize int8` for the int8-built variant: the shipped int8 engine)."""
    tag = f"{model}-{dtype}-{backend}" + ("" if quantize == "none" else f"-{quantize}")
    out = root / tag
    build(BuildOptions(model=model, weights="bundled:digits", backend=backend, dtype=dtype, quantize=quantize), out,
          graphs_dir=root / f"graphs-{tag}", progress=False)
    return svdexport.load(out)


def int8_engine(root: Path, model: str, variant: str, scratch: Path):
    e = svdexport.load(root / f"{model}-fp32-eager")
    full, cached = eager_graphs(e.manifest)
    x = e.example_inputs(0)
    state = {**x, "bases": e.bases.vectors, "timestep": e.sampling.model_timestep(torch.tensor(500.0),
                                                                                     x["hidden_states"])}
    with torch.no_grad():
        _, state["coeffs"], state["residuals"] = full(*[state[n] for n in full.input_names])
    graphs = []
    for name, g in (("full", full), ("cached", cached)):
        args = tuple(state[n] for n in g.input_names)
        kept = [] if variant == "int8-all" else qz.conditioning_linears(g, args, e.shapes.batch)
        module = qz.quantize_pt2e(g, args, kept)
        program = torch.export.export(module, args, strict=False)
        scheme = qz.QuantScheme("int8", qz.PT2E_X86, "per-tensor, dynamic", kept=kept)
        package, info = aoti(f"{model}-{variant}-{name}", program, qz.inductor_configs(scheme), None, scratch)
        print(f"  {variant} {name}: kept {len(kept)} linears; {info}", flush=True)
        graphs.append(Graph(package, g.input_names, g.output_names))
    e.full, e.cached = graphs
    e.sampler.full, e.sampler.cached = graphs
    return e


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="flux")
    p.add_argument("--root", default="/tmp/int8w/quality")
    p.add_argument("--seeds", default="2000-2015")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--budget", type=int, default=9)
    p.add_argument("--variants", default="int8-all,int8-kept")
    a = p.parse_args()
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    lo, hi = (int(s) for s in a.seeds.split("-"))
    start = time.perf_counter()
    e32 = engine(root, a.model, "fp32", "eager")
    e16 = engine(root, a.model, "bf16", "aoti")
    print(f"engines built in {time.perf_counter() - start:.0f} s", flush=True)
    (root / "packages").mkdir(exist_ok=True)
    e8 = {v: engine(root, a.model, "fp32", "aoti", "int8") if v == "int8-built"  # build --quantize int8
          else int8_engine(root, a.model, v, root / "packages") for v in a.variants.split(",")}
    rows: dict[str, list[float]] = {}

    def add(name: str, gen, ref) -> None:
        img = e32.family.unpack(gen.latents.float(), e32.shapes)[0]
        rows.setdefault(name, []).append(min(psnr(img, ref), 99.0))

    b = a.budget
    for seed in range(lo, hi + 1):
        labels = [seed % len(e16.labels)] * e16.shapes.batch if e16.labels else None
        x16 = e16.example_inputs(seed, labels)
        x32 = {k: v.float() if v.is_floating_point() else v for k, v in x16.items()}
        ref = e32.family.unpack(e32.generate(x32, steps=a.steps, interval=1).latents, e32.shapes)[0]
        add(f"fp32 SVD-Cache, {b} of {a.steps}", e32.generate(x32, steps=a.steps, full_steps=b), ref)
        add("bf16 full compute", e16.generate(x16, steps=a.steps, interval=1), ref)
        add(f"bf16 SVD-Cache, {b} of {a.steps}", e16.generate(x16, steps=a.steps, full_steps=b), ref)
        for v, e in e8.items():
            add(f"{v} full compute", e.generate(x32, steps=a.steps, interval=1), ref)
            add(f"{v} SVD-Cache, {b} of {a.steps}", e.generate(x32, steps=a.steps, full_steps=b), ref)
        print(f"seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"\n{a.model} bundled:digits, seeds {a.seeds}, {a.steps} steps; PSNR (dB) against fp32 full compute")
    print("| variant | mean | worst |")
    print("|---|---|---|")
    for name, vals in rows.items():
        print(f"| {name} | {statistics.mean(vals):.2f} | {min(vals):.2f} |")
    bf16 = statistics.mean(rows[f"bf16 SVD-Cache, {b} of {a.steps}"])
    for v in e8:
        m = statistics.mean(rows[f"{v} SVD-Cache, {b} of {a.steps}"])
        print(f"gate {v}: int8 SVD-Cache {m:.2f} dB vs bf16 SVD-Cache {bf16:.2f} dB: "
              f"{m - bf16:+.2f} dB ({'pass' if m >= bf16 - 0.5 else 'FAIL'}, needs >= -0.50)")


if __name__ == "__main__":
    main()
