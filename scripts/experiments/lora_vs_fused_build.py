"""Is a LoRA loaded into a built engine the same as an engine built from the fused weights? (docs/lora.md)

Fuses LORA into the bundled digits model (diffusers + PEFT, as engine.load_lora does), saves it as a weights
folder, builds an engine of BACKEND from it, loads LORA into BASE_ENGINE (built from bundled:digits with the
same backend and shapes) and compares 50-step generations with the same bases and a uniform plan.

    python scripts/experiments/lora_vs_fused_build.py BACKEND BASE_ENGINE LORA.safetensors [WORK_DIR]
"""

import shutil
import sys
from pathlib import Path

import torch

import svdexport
from svdexport.models.flux import FLUX, BUNDLED_DIR
from svdexport.models.lora import LoraFile, fuse
from svdexport.builder.build import BuildOptions, build
backend, base_engine, lora = sys.argv[1:4]
root = Path(sys.argv[4] if len(sys.argv) > 4 else f"lora-vs-fused-{backend}")
shutil.rmtree(root, ignore_errors=True)
shutil.copytree(BUNDLED_DIR / "flux_digits", root / "weights")
model = FLUX.load(FLUX.inspect("bundled:digits"), torch.float32)
fuse(model, "FluxLoraLoaderMixin", [LoraFile.parse(lora)])
model.save_pretrained(root / "weights")
build(BuildOptions(weights=str(root / "weights"), backend=backend, shapes=dict(height=128, width=128, text_len=8),
                   calib_samples=1, calib_steps=4), root / "engine", graphs_dir=root / "graphs", progress=False)
fused = svdexport.load(root / "engine")
swapped = svdexport.load(base_engine)
swapped.load_lora(lora)
swapped.sampler.bases = fused.sampler.bases  # the same bases, so the graphs alone differ
with torch.no_grad():
    for s in range(4):
        a = swapped.generate(seed=s, labels=[s], steps=50, plan="uniform").latents
        b = fused.generate(seed=s, labels=[s], steps=50, plan="uniform").latents
        print(f"{backend} seed {s}: max |swapped - fused engine| = {(a - b).abs().max():.2e} (output scale {b.abs().max():.2f}), bitwise equal: {torch.equal(a, b)}")
