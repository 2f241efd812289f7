"""A random LoRA of the bundled digits model, made with PEFT and saved as diffusers saves LoRAs (docs/lora.md).

Rank 8 on every attention and MLP projection; A and B random (PEFT starts B at zero, which changes nothing),
both scaled by SCALE: 0.3 moves the digits little (43.7 dB from the base output), 0.8 a lot (26.4 dB).

    python scripts/experiments/make_lora.py OUT.safetensors SCALE SEED [WEIGHTS]

WEIGHTS (default bundled:digits): any FLUX weights `build --weights` takes, e.g. bundled:flux1-reduced for a
LoRA at FLUX.1's width (rank 8 there: 37.7M parameters).
"""

import sys
from pathlib import Path

import torch
from diffusers import FluxPipeline
from peft import LoraConfig, get_peft_model_state_dict

from svdexport.models.flux import FLUX

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp",
           "proj_out", "ff.net.0.proj", "ff.net.2"]

if __name__ == "__main__":
    out, scale, seed = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    weights = sys.argv[4] if len(sys.argv) > 4 else "bundled:digits"
    model = FLUX.load(FLUX.inspect(weights), torch.float32)
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS))
    state = {k: v * scale for k, v in get_peft_model_state_dict(model).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(out.parent, transformer_lora_layers=state, weight_name=out.name)
    print(f"wrote {out}: {len(state) // 2} adapted modules, rank 8, scale {scale}")
