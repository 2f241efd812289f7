"""Issue 27 item 4: one full step (the full-compute graph: transformer + the SVD-Cache split) with dense attention
against the sparse tile-window attention, both compiled by AOTInductor as the aoti backend builds them (constants
not in the package, bound at load), timed side by side in one process (interleaved rounds, medians).

    PYTHONPATH=. .venv/bin/python scripts/experiments/sparse_full_step.py --model hunyuanvideo --weights bundled:random \\
        --frames 29 --height 512 --width 512 --text-len 256
    PYTHONPATH=. .venv/bin/python scripts/experiments/sparse_full_step.py --model flux --weights bundled:flux1-reduced \\
        --height 1024 --width 1024 --text-len 512
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings

import torch

from svdexport.models import FAMILIES
from svdexport.models.sparse_attention import parse_attention
from svdexport.models.sparse_processor import install, layout_for, uninstall


def aoti(module, args, where: str):
    """The module exported and compiled as the aoti backend does it, its constants bound (user-managed)."""
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    program = torch.export.export(module, args, strict=False)
    path = aoti_compile_and_package(program, package_path=where,
                                    inductor_configs={"aot_inductor.package_constants_in_so": False})
    package = aoti_load_package(path)
    consts = {**program.state_dict, **program.constants}
    values = {f: consts[f].contiguous() for f in package.get_constant_fqns()}
    package.load_constants(values, check_full_update=True, user_managed=True)
    package.keep = values
    return package


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=("flux", "hunyuanvideo"), required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--text-len", type=int, required=True)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--options", default="sparse", help="sparse options, ';'-separated")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rank", type=int, default=8, help="SVD-Cache bases rank k (random orthonormal bases)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    fam = FAMILIES[a.model]
    dtype = getattr(torch, a.dtype)
    info = fam.inspect(a.weights)
    shapes = {"height": a.height, "width": a.width, "text_len": a.text_len}
    if a.frames:
        shapes["frames"] = a.frames
    shapes = fam.shapes(shapes)
    model = fam.load(info, dtype)
    config = dict(model.config)
    x = fam.example_inputs(config, shapes, 0, dtype=dtype)
    sites, d = len(fam.sites(config, "block")), fam.hidden_size(config)
    g = torch.Generator().manual_seed(1)
    bases = torch.linalg.qr(torch.randn(sites, d, d, generator=g))[0][..., : a.rank].contiguous()
    state = {**x, "timestep": torch.full((shapes.batch,), 0.5 if a.model == "flux" else 500.0, dtype=dtype),
             "bases": bases}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {os.getloadavg()}, "
          f"{a.model} {shapes}, image tokens {shapes.img_tokens}", flush=True)
    engines, layouts, build_s = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for name in ["dense", *a.options.split(";")]:
            full, _ = fam.graphs(model, "block")
            args = tuple(state[n] for n in full.input_names)
            originals = None
            if name != "dense":
                layouts[name] = layout_for(a.model, shapes, parse_attention(name, 3 if a.model == "hunyuanvideo" else 2))
                originals = install(model, layouts[name])
            t = time.perf_counter()
            engines[name] = aoti(full, args, os.path.join(tmp, f"{len(engines)}.pt2"))
            build_s[name] = time.perf_counter() - t
            if originals is not None:
                uninstall(model, originals)
            print(f"  built {name} in {build_s[name]:.0f} s", flush=True)
        args = tuple(state[n] for n in full.input_names)
        outs = {n: e(*args) for n, e in engines.items()}  # warm, and the outputs for the drift line
        times = {n: [] for n in engines}
        for _ in range(a.rounds):
            for n, e in engines.items():
                t = time.perf_counter()
                e(*args)
                times[n].append(time.perf_counter() - t)
    dense = statistics.median(times["dense"])
    ref = outs["dense"][0].float()
    for n, ts in times.items():
        med = statistics.median(ts)
        lay = layouts.get(n)
        drift = (outs[n][0].float() - ref).norm() / ref.norm()
        row = {"model": a.model, "weights": a.weights, "shapes": shapes.to_dict(), "tokens": shapes.img_tokens +
               shapes.text_len, "dtype": a.dtype, "variant": n, "median_s": med, "vs_dense": dense / med,
               "kept": None if lay is None else round(lay.kept, 4),
               "blocks_computed": None if lay is None else round(lay.computed, 4),
               "rel_change_of_noise_pred": float(drift), "build_s": round(build_s[n], 1), "load": os.getloadavg()[0]}
        print(f"{n:36s} {med:8.3f} s  x{dense / med:.2f} vs dense  kept {row['kept']}  blocks {row['blocks_computed']}"
              f"  |noise - dense| / |dense| {drift:.3f}", flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(f"load at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
