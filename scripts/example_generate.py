"""Load an engine built by `svdexport build` and generate from your own script.

    .venv/bin/python scripts/example_generate.py engines/flux-eager --seeds 0 1 2
"""

import argparse
from pathlib import Path

import svdexport

p = argparse.ArgumentParser()
p.add_argument("engine")
p.add_argument("--seeds", type=int, nargs="+", default=[0])
p.add_argument("--steps", type=int, default=50)
p.add_argument("--out", default="out/example")
a = p.parse_args()

engine = svdexport.load(a.engine)  # verifies the manifest and every file hash
Path(a.out).mkdir(parents=True, exist_ok=True)
for seed in a.seeds:
    # Your own tensors can go in `inputs=`; names and shapes are in engine.manifest.shapes.inputs.
    result = engine.generate(seed=seed, steps=a.steps)
    engine.preview(result.latents).save(f"{a.out}/seed{seed}.png")
    print(f"seed {seed}: {result.full_steps} full + {result.cached_steps} cached steps in {result.seconds:.2f} s")
