"""Your FluxPipeline with an svdexport engine as its transformer: text encoders, VAE and prompts unchanged.

    svdexport build --weights ~/models/FLUX.1-dev --backend aoti --out engines/flux1-dev-aoti
    .venv/bin/python scripts/example_pipeline.py ~/models/FLUX.1-dev engines/flux1-dev-aoti "a red fox in snow"
"""

import argparse
from pathlib import Path

import torch
from diffusers import FluxPipeline

import svdexport

p = argparse.ArgumentParser()
p.add_argument("weights", help="the FLUX.1 pipeline folder the engine was built from")
p.add_argument("engine")
p.add_argument("prompt", nargs="+")
p.add_argument("--steps", type=int, help="default: the engine's (50 for dev, 4 for schnell)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--out", default="out/pipeline")
a = p.parse_args()

engine = svdexport.load(a.engine)  # verifies the manifest and every file hash
# transformer=None: the engine replaces it, so the 24 GB transformer is never loaded.
pipe = FluxPipeline.from_pretrained(a.weights, transformer=None, torch_dtype=engine.dtype).to(engine.device)
svdexport.apply(pipe, engine)
Path(a.out).mkdir(parents=True, exist_ok=True)
for i, prompt in enumerate(a.prompt):
    # height, width and max_sequence_length are fixed by the build; the cache resets at every call.
    image = pipe(prompt, height=engine.shapes.height, width=engine.shapes.width,
                 max_sequence_length=engine.shapes.text_len, num_inference_steps=a.steps or engine.steps,
                 generator=torch.Generator().manual_seed(a.seed)).images[0]
    image.save(f"{a.out}/{i}.png")
    plan = pipe.transformer.plan_of_last_call()
    print(f"{a.out}/{i}.png: {sum(plan)} full + {len(plan) - sum(plan)} cached steps")
