"""Train the bundled reference video model: a small HunyuanVideo-architecture transformer on moving digits.

    .venv/bin/python scripts/train_reference_video.py --out svdexport/models/bundled/hunyuanvideo_digits

- Data: the 1,797 8x8 handwritten digits that ship inside scikit-learn (their own 8x8 pixels, scaled to
  [-1, 1]), pasted into 12x12 frames of background -1 and moved across the frame: 3 frames, 2 pixels per
  frame, right / left / down / up, at a random offset across the motion. One digit and one direction per
  clip. There is no VAE: the clip [1, 3, 12, 12] *is* the latent tensor [C, F, H, W], which the family's
  VideoShapes reaches as 9 video frames of 96x96 ((9 - 1) // 4 + 1 = 3 latent frames, 96 / 8 = 12).
- Model: diffusers' HunyuanVideoTransformer3DModel (2 double + 2 single blocks, 1 token-refiner block,
  hidden 128 = 4 heads x 32, patch 1x2x2, 1 channel: 3 x 6 x 6 = 108 image tokens, no guidance embedder),
  conditioned on (digit, direction) through a learned prompt-embedding table that stands in for the text
  encoders: per row 8 "text tokens" (encoder_hidden_states, the last 2 masked out by
  encoder_attention_mask, so the padded-prompt path is trained) and a pooled vector (pooled_projections).
  The rows are a digit part plus a direction part, learned jointly with the transformer; the 40 summed
  rows (label "3 right" = row 3 * 4 + 0) are saved as the table.
- Objective: rectified flow as FLUX's script. x_t = (1 - t) x_0 + t e, the model predicts e - x_0, t
  logit-normal; the model sees HunyuanVideo's raw scheduler timestep 1000 t (no division by 1000), as
  HunyuanVideoSampling.model_timestep passes it.
- Reproducible: fixed seed and step count; the loss curve, data and settings go to svdexport.json.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import HunyuanVideoTransformer3DModel
from safetensors.torch import save_file

CONFIG = dict(in_channels=1, out_channels=1, num_attention_heads=4, attention_head_dim=32, num_layers=2,
              num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=False,
              text_embed_dim=64, pooled_projection_dim=32, rope_axes_dim=(8, 12, 12))
TEXT_LEN, VALID = 8, 6  # learned "text tokens" per row; the first VALID are unmasked
SIDE, FRAMES, STEP = 12, 3, 2  # frame side, frames per clip, pixels moved per frame
DIRECTIONS = ("right", "left", "down", "up")  # row = digit * 4 + direction
LABELS = [f"{d} {name}" for d in range(10) for name in DIRECTIONS]


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as [N, 8, 8] in [-1, 1] and labels [N]."""
    from sklearn.datasets import load_digits as sk_load

    d = sk_load()
    return torch.tensor(d.images, dtype=torch.float32) / 16.0 * 2 - 1, torch.tensor(d.target)


def clips(digits: torch.Tensor, direction: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Clips [B, 1, FRAMES, SIDE, SIDE]: digit b moving in direction[b] (index into DIRECTIONS), at
    `offset[b]` pixels (0 .. SIDE - 8) across the motion."""
    b = len(digits)
    out = torch.full((b, 1, FRAMES, SIDE, SIDE), -1.0)
    for i in range(b):
        for f in range(FRAMES):
            along = f * STEP if direction[i] in (0, 2) else (FRAMES - 1 - f) * STEP  # right/down grow
            y, x = (offset[i], along) if direction[i] in (0, 1) else (along, offset[i])
            out[i, 0, f, y:y + 8, x:x + 8] = digits[i]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="svdexport/models/bundled/hunyuanvideo_digits")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--ema", type=float, default=0.998, help="decay of the weight EMA that is saved (warmed up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--side", type=int, default=SIDE, help="frame side in pixels (even, >= 8)")
    p.add_argument("--step", type=int, default=STEP, help="pixels the digit moves per frame")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine two threads spin-wait on each other, 5x slower)")
    p.add_argument("--snapshot", help="also write the EMA model here every 500 steps (to look at it early)")
    a = p.parse_args()
    globals().update(SIDE=a.side, STEP=a.step)
    assert a.side % 2 == 0 and (FRAMES - 1) * STEP <= SIDE - 8, "the digit must stay inside the frame"

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    digits, targets = load_digits()
    model = HunyuanVideoTransformer3DModel(**CONFIG).train()
    emb = {
        "digit_tokens": torch.nn.Parameter(torch.randn(10, TEXT_LEN, CONFIG["text_embed_dim"])),
        "direction_tokens": torch.nn.Parameter(torch.randn(len(DIRECTIONS), TEXT_LEN, CONFIG["text_embed_dim"])),
        "digit_pooled": torch.nn.Parameter(torch.randn(10, CONFIG["pooled_projection_dim"])),
        "direction_pooled": torch.nn.Parameter(torch.randn(len(DIRECTIONS), CONFIG["pooled_projection_dim"])),
    }
    mask = torch.zeros(TEXT_LEN, dtype=torch.int64)
    mask[:VALID] = 1
    params = list(model.parameters()) + list(emb.values())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    warm = max(1, a.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps)))
    ema = [q.detach().clone() for q in params]
    log, start, running = [], time.time(), 0.0
    for step in range(a.steps):
        idx = torch.randint(0, len(digits), (a.batch,))
        direction = torch.randint(0, len(DIRECTIONS), (a.batch,))
        offset = torch.randint(0, SIDE - 8 + 1, (a.batch,))
        x0, y = clips(digits[idx], direction, offset), targets[idx]
        noise = torch.randn_like(x0)
        t = torch.sigmoid(torch.randn(a.batch))  # logit-normal, as SD3/FLUX training
        tt = t[:, None, None, None, None]
        xt = (1 - tt) * x0 + tt * noise
        pred = model(hidden_states=xt, timestep=t * 1000,
                     encoder_hidden_states=emb["digit_tokens"][y] + emb["direction_tokens"][direction],
                     encoder_attention_mask=mask.expand(a.batch, -1),
                     pooled_projections=emb["digit_pooled"][y] + emb["direction_pooled"][direction],
                     return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(a.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, q in zip(ema, params):
                e.lerp_(q.detach(), 1 - decay)
        running += loss.item()
        if (step + 1) % 50 == 0:
            entry = {"step": step + 1, "loss": round(running / 50, 5), "seconds": round(time.time() - start, 1)}
            log.append(entry)
            running = 0.0
            print(json.dumps(entry), flush=True)
        if a.snapshot and (step + 1) % 500 == 0 and step + 1 < a.steps:
            save(Path(a.snapshot), model, emb, mask, ema, params, a, log, round((time.time() - start) / 60, 1))
    save(Path(a.out), model, emb, mask, ema, params, a, log, round((time.time() - start) / 60, 1))


def save(out: Path, model, emb, mask, ema, params, a, log, minutes) -> None:
    """The EMA weights (diffusers layout), the conditioning table and svdexport.json into `out`."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        n = len(list(model.parameters()))  # params = the model's, then the embeddings'; ema in that order
        for q, e in zip(model.parameters(), ema[:n]):
            q.copy_(e)
        emb = dict(zip(emb, ema[n:]))
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    rows = torch.arange(len(LABELS))
    d, m = rows // len(DIRECTIONS), rows % len(DIRECTIONS)
    table = {"encoder_hidden_states": emb["digit_tokens"][d] + emb["direction_tokens"][m],
             "pooled_projections": emb["digit_pooled"][d] + emb["direction_pooled"][m],
             "encoder_attention_mask": mask.expand(len(LABELS), -1)}
    save_file({k: v.detach().contiguous() for k, v in table.items()}, str(out / "conditioning.safetensors"))
    weights = out / "diffusion_pytorch_model.safetensors"
    meta = {
        "description": "HunyuanVideo-architecture transformer trained with rectified flow on scikit-learn's digits "
                       "moving across 16x16 frames (pixels are the latents; no VAE)",
        "conditioning": {"kind": "class-table", "file": "conditioning.safetensors", "labels": LABELS,
                         "rows": "digit * 4 + direction, directions " + " / ".join(DIRECTIONS),
                         "valid_text_tokens": VALID},
        "shapes": {"batch": 1, "frames": (FRAMES - 1) * 4 + 1, "height": SIDE * 8, "width": SIDE * 8,
                   "text_len": TEXT_LEN},
        "pixels": {"side": SIDE, "frames": FRAMES, "range": [-1, 1], "channels": 1, "step": STEP,
                   "directions": list(DIRECTIONS)},
        "training": {"seed": a.seed, "steps": a.steps, "batch": a.batch, "lr": a.lr, "ema": a.ema,
                     "data": "sklearn.datasets.load_digits, 1797 images at their own 8x8 in [-1, 1], pasted into "
                             f"{SIDE}x{SIDE} frames of -1, {FRAMES} frames moving {STEP} px per frame in one of "
                             f"{len(DIRECTIONS)} directions at a uniform offset 0..{SIDE - 8} across the motion",
                     "timesteps": "logit-normal t, model timestep 1000 t", "minutes": minutes,
                     "threads": torch.get_num_threads(), "torch": torch.__version__, "loss": log},
        "sha256": {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
                   for f in (weights, out / "conditioning.safetensors")},
    }
    (out / "svdexport.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"saved {out} ({weights.stat().st_size / 1e6:.1f} MB) in {minutes} min")


if __name__ == "__main__":
    main()
