"""Issue 25's proof on a small machine: a FLUX.1-width transformer larger than a third of its memory, built with
engines that reference its weights, measured.

    python scripts/measure_full_size.py [--model DIR] [--backends aoti,onnx] [--work DIR] [--md docs/full_size.md]

1. The model: `scripts/make_random_checkpoint.py DIR --preset flux1-40pct` (FLUX.1-dev's width, 8 double + 16
   single blocks, random bf16 weights, 10.1 GB), made unless DIR exists.
2. Per backend: `svdexport build --weights DIR --backend B --dtype bf16 --height 256 --width 256 --text-len 64
   --calib-samples 1 --calib-steps 4` under /usr/bin/time -v (peak RSS of the whole build process, wall time);
   the engine and graphs folders' sizes.
3. Loads, each in a fresh process: the first with an empty hash cache (every referenced byte hashed), the
   second with the cache the first one filled (unsigned loads take the digests of unchanged files from it).
4. Parity at interval 1 (every step full, 4 steps): relative L2 of the final latents against the exact model,
   eager PyTorch computing in float32 from the bf16 weights (each weight read as float32 where it is used, so
   the reference fits in bf16's memory), for the engine and for eager bf16 (the rounding any bf16 run has).
Writes a markdown table (stdout, and --md). Which CPU: printed with the table (svdexport.hardware).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BUILD = ["--dtype", "bf16", "--height", "256", "--width", "256", "--text-len", "64", "--calib-samples", "1",
         "--calib-steps", "4"]


def run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall s, peak RSS GiB, stdout) of a command under /usr/bin/time -v."""
    proc = run(["/usr/bin/time", "-v", *cmd], env)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 2**20
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr).group(1)
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    return seconds, rss, proc.stdout


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


LOAD = """
import json, sys, time
t = time.perf_counter()
import svdexport
e = svdexport.load(sys.argv[1])
print(json.dumps({"load_s": time.perf_counter() - t}))
"""

PARITY = """
import dataclasses, json, sys, torch
from torch.nn.utils import parametrize
import svdexport
from svdexport.runtime.base import base_model
from svdexport.runtime.engine import Engine

class Up(torch.nn.Module):  # a bf16 weight read as float32 where it is used: the fp32 reference in bf16's memory
    def forward(self, w):
        return w.float()

e = svdexport.load(sys.argv[1])
x = e.example_inputs(seed=0)
got = e.generate(x, steps=4, interval=1).latents.float()
bf16 = e.eager_reference().generate(x, steps=4, interval=1).latents.float()
model = base_model(e.manifest)
for module in list(model.modules()):
    for name, p in list(module.named_parameters(recurse=False)):
        parametrize.register_parametrization(module, name, Up(), unsafe=True)
manifest = dataclasses.replace(e.manifest, dtype="float32", backend="eager")
full, cached = e.family.graphs(model, manifest.cache.granularity)
ref = Engine(e.folder, manifest, full, cached, e.bases)
want = ref.generate({k: v.float() if v.is_floating_point() else v for k, v in x.items()}, steps=4,
                    interval=1).latents.float()
rel = lambda a: float((a - want).norm() / want.norm())
print(json.dumps({"rel_l2": rel(got), "eager_bf16_rel_l2": rel(bf16)}))
"""


def measure(model: Path, backend: str, work: Path) -> dict:
    out, graphs = work / f"{backend}-engine", work / f"{backend}-graphs"
    seconds, rss, stdout = timed([PY, "-m", "svdexport.cli", "build", "--weights", str(model), "--backend", backend,
                                  "--out", str(out), "--graphs", str(graphs), "--force", *BUILD])
    manifest = json.loads((out / "manifest.json").read_text())
    weight_bytes = manifest["bound"]["referenced_bytes"] + manifest["bound"]["embedded_bytes"]
    cache = Path(tempfile.mkdtemp(prefix="svdexport-hash-cache-"))
    loads = [json.loads(run([PY, "-c", LOAD, str(out)], {"XDG_CACHE_HOME": str(cache)}).stdout.splitlines()[-1])
             ["load_s"] for _ in range(2)]
    parity = json.loads(run([PY, "-c", PARITY, str(out)]).stdout.splitlines()[-1])
    return {"backend": backend, "build_s": seconds, "peak_rss_gib": rss, "weight_gib": weight_bytes / 2**30,
            "estimate_gib": manifest["memory"]["peak_bytes"] / 2**30,
            "engine_mib": size(out) / 2**20, "graphs_mib": size(graphs) / 2**20,
            "first_load_s": loads[0], "cached_load_s": loads[1], **parity}


def table(rows: list[dict], cpu: str) -> str:
    lines = [f"Machine: {cpu}. Model: FLUX.1 width, 8 double + 16 single blocks, random bf16 weights.", "",
             "| backend | build s | build peak RSS GiB | weights GiB | bound 1.3x + 2 GiB | estimated peak GiB | "
             "engine + graphs MiB (share of weights) | first load s | cached-hash load s | engine vs fp32 "
             "reference (rel. L2, interval 1) | eager bf16 vs the same |", "|---" * 11 + "|"]
    for r in rows:
        bound = 1.3 * r["weight_gib"] + 2
        share = (r["engine_mib"] + r["graphs_mib"]) / (r["weight_gib"] * 1024)
        lines.append(f"| {r['backend']} | {r['build_s']:.0f} | {r['peak_rss_gib']:.2f} | {r['weight_gib']:.2f} | "
                     f"{bound:.2f} ({'met' if r['peak_rss_gib'] <= bound else 'NOT met'}) | {r['estimate_gib']:.1f} | "
                     f"{r['engine_mib']:.1f} + {r['graphs_mib']:.1f} ({share:.2%}) | {r['first_load_s']:.1f} | "
                     f"{r['cached_load_s']:.1f} | {r['rel_l2']:.2e} | {r['eager_bf16_rel_l2']:.2e} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/work/models/flux1-40pct", help="the model folder (made if missing)")
    ap.add_argument("--backends", default="aoti,onnx")
    ap.add_argument("--work", default=None, help="where engines go (default: a temporary folder)")
    ap.add_argument("--md", help="also write the table here")
    a = ap.parse_args()
    model = Path(a.model)
    if not model.exists():
        run([PY, "scripts/make_random_checkpoint.py", str(model), "--preset", "flux1-40pct"])
    work = Path(a.work or tempfile.mkdtemp(prefix="svdexport-full-size-"))
    sys.path.insert(0, str(ROOT))
    from svdexport.hardware import describe_cpu

    start = time.time()
    rows = [measure(model, b, work) for b in a.backends.split(",")]
    text = table(rows, describe_cpu()) + f"\n\nCommand: python scripts/measure_full_size.py --backends {a.backends} " \
        f"({time.time() - start:.0f} s)\n"
    print(text)
    if a.md:
        Path(a.md).write_text(f"<!-- generated by: python scripts/measure_full_size.py --backends {a.backends} -->\n"
                              + text)


if __name__ == "__main__":
    main()
