"""Issue 27 item 4: CPU FlexAttention with the tile-window block mask against dense SDPA, attention alone.

One attention call at the real models' head layout (FLUX.1 and HunyuanVideo: 24 heads x 128), batch 1, over the joint
sequence (text + image tokens) of several token grids; per grid: dense SDPA (what every dense engine runs on CPU:
PyTorch's flash-attention CPU kernel), FlexAttention compiled by Inductor (its C++ CPU template) with no mask (the
kernel's own dense cost), and with the sparse layout's BlockMask (the tile-ordered q/k/v; the reordering gathers are
in the full-step measurement, not here). Timed side by side in one process: rounds interleave the variants, medians.

    PYTHONPATH=. .venv/bin/python scripts/experiments/sparse_attention_speed.py --family flux --grids 32x32,48x48,64x64
    PYTHONPATH=. .venv/bin/python scripts/experiments/sparse_attention_speed.py --family hunyuanvideo \\
        --grids 4x16x16,8x16x16,8x24x24,8x32x32
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import torch
from torch.nn.attention.flex_attention import flex_attention

from svdexport.models.sparse_attention import make_layout, parse_attention


def timed(fn, rounds: list, name: str) -> None:
    t = time.perf_counter()
    fn()
    rounds.append((name, time.perf_counter() - t))


def one_grid(family: str, grid: tuple[int, ...], text_len: int, options: list[str], dtype, rounds: int,
             heads: int, head_dim: int) -> list[dict]:
    video = family == "hunyuanvideo"
    layouts = {o: make_layout(parse_attention(o, len(grid)), grid, text_len, text_first=not video, padded_text=video)
               for o in options}
    n = next(iter(layouts.values())).tokens
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=g).to(dtype) for _ in range(3))
    valid = torch.ones(1, n, dtype=torch.bool)
    if video:  # a prompt of 3/4 of the text length, as the synthetic inputs have
        valid[:, n - text_len + (3 * text_len) // 4:] = False
    torch._dynamo.reset()  # a fresh compile per grid (each grid and mask is a recompile of flex_attention)
    compiled = torch.compile(flex_attention)
    fns = {"sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=valid[:, None, None, :] if video else None)}
    fns["flex-dense"] = lambda: compiled(q, k, v)
    masks = {o: lay.block_mask(valid if video else None) for o, lay in layouts.items()}
    for o in options:
        fns[f"flex-{o}"] = lambda o=o: compiled(q, k, v, block_mask=masks[o])
    compile_s = {}
    for name, fn in fns.items():  # warm: the compiles (and the first call of each kernel)
        t = time.perf_counter()
        fn()
        compile_s[name] = time.perf_counter() - t
    times: list = []
    for _ in range(rounds):
        for name, fn in fns.items():
            timed(fn, times, name)
    out = []
    med = {name: statistics.median(t for nm, t in times if nm == name) for name in fns}
    for name in fns:
        lay = layouts.get(name.removeprefix("flex-"))
        out.append({"family": family, "grid": "x".join(map(str, grid)), "tokens": n, "dtype": str(dtype)[6:],
                    "variant": name, "median_s": med[name], "vs_sdpa": med["sdpa"] / med[name],
                    "kept": None if lay is None else round(lay.kept, 4),
                    "blocks_computed": None if lay is None else round(lay.computed, 4),
                    "first_call_s": round(compile_s[name], 2)})
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--family", choices=("flux", "hunyuanvideo"), required=True)
    p.add_argument("--grids", required=True, help="token grids, e.g. 32x32,64x64 or 8x32x32")
    p.add_argument("--options", default=None, help="sparse options, ';'-separated (default: the family default "
                   "and a tighter window)")
    p.add_argument("--text-len", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None, help="append JSON lines here")
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    default_opts = {"flux": "sparse;sparse:window=1", "hunyuanvideo": "sparse;sparse:tile=2x8x8,window=0x1x1"}
    options = (a.options or default_opts[a.family]).split(";")
    text_len = a.text_len or (512 if a.family == "flux" else 256)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {os.getloadavg()}", flush=True)
    for spec in a.grids.split(","):
        grid = tuple(int(x) for x in spec.split("x"))
        rows = one_grid(a.family, grid, text_len, options, getattr(torch, a.dtype), a.rounds, 24, 128)
        for r in rows:
            print(f"{r['family']:12s} {r['grid']:9s} {r['tokens']:6d} {r['dtype']:8s} {r['variant']:34s} "
                  f"{r['median_s'] * 1e3:9.1f} ms  x{r['vs_sdpa']:.2f} vs sdpa  kept {r['kept']}  "
                  f"blocks {r['blocks_computed']}", flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps({**r, "load": os.getloadavg()[0]}) + "\n")
    print(f"load at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
