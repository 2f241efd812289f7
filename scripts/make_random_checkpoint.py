"""A random-weight FLUX.1 transformer as a local diffusers folder, written without holding the model in memory.

    python scripts/make_random_checkpoint.py OUT [--preset flux1-dev|flux1-40pct|tiny] [--double N] [--single N]
                                             [--seed 0] [--device cpu|cuda] [--max-shard-gb 5] [--force]

Presets: `flux1-dev` is FLUX.1-dev's exact transformer config (19 double + 38 single blocks, hidden 3072 = 24
heads x 128, joint attention 4096, pooled 768, guidance embedder, rope axes 16/56/56, 64 input channels:
11.9B parameters, 23.8 GB in bf16); `flux1-40pct` the same width at 8 double + 16 single blocks (5.05B
parameters, 10.1 GB = 9.4 GiB: 39% of a 24 GiB machine); `tiny` a 1 + 1 block, 4 x 32 wide model for
tests. --double / --single override the depth of any preset.

How: the module tree is built on the meta device (names, shapes, dtypes; nothing allocated), then each tensor
is generated on its own, written and dropped, so the peak memory is one tensor, not the model. Shards of at
most --max-shard-gb are streamed to disk by a small safetensors writer (8-byte little-endian header length,
the JSON header with dtype / shape / data_offsets and `__metadata__` {"format": "pt"}, the raw bytes in
order), with diffusers' index `diffusion_pytorch_model.safetensors.index.json` when there are several; the
folder appears only when complete (svdexport.files.atomic_dir).

Values (bf16), PyTorch's default initialisation, so activations keep a sane scale at any depth: every
nn.Linear weight and bias uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) (what nn.Linear.reset_parameters gives),
norm weights 1 and norm biases 0. Each tensor has its own generator, seeded from (--seed, its name), so any
tensor can be regenerated alone (`tensor_values`); values are drawn in float32 on --device and rounded to
bf16, so a cuda folder differs from a cpu folder of the same seed (different generators), each reproducible.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from svdexport.errors import SvdExportError  # noqa: E402
from svdexport.files import atomic_dir  # noqa: E402

FLUX1_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
             "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
             "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}
PRESETS = {
    "flux1-dev": FLUX1_DEV,
    "flux1-40pct": {**FLUX1_DEV, "num_layers": 8, "num_single_layers": 16},
    # hidden 128 (4 x 32): wide enough for the build's k_max of 64
    "tiny": {**FLUX1_DEV, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 32, "num_attention_heads": 4,
             "joint_attention_dim": 32, "pooled_projection_dim": 16, "in_channels": 16, "axes_dims_rope": [8, 12, 12]},
}
DTYPE = torch.bfloat16
SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
WEIGHTS_NAME = "diffusion_pytorch_model"
INDEX_NAME = f"{WEIGHTS_NAME}.safetensors.index.json"


PROVENANCE = "random_checkpoint.json"


def provenance(config: dict, seed: int, device: str) -> dict:
    return {"config": config, "seed": seed, "device": device, "dtype": str(DTYPE).removeprefix("torch."),
            "init": "nn.Linear default: uniform(+-1/sqrt(fan_in)) weights and biases; norms weight 1, bias 0",
            "made_by": "scripts/make_random_checkpoint.py"}


@dataclass
class TensorSpec:
    """One tensor of the checkpoint and how its values are drawn."""

    name: str
    shape: tuple[int, ...]
    init: str  # "uniform" (bound `bound`), "ones" or "zeros"
    bound: float = 0.0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE.itemsize


def config_for(preset: str, double: int | None = None, single: int | None = None) -> dict:
    if preset not in PRESETS:
        raise SvdExportError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    config = dict(PRESETS[preset])
    for key, value in (("num_layers", double), ("num_single_layers", single)):
        if value is not None:
            if value < 0:
                raise SvdExportError(f"block counts must be >= 0, got {value}")
            config[key] = value
    return config


def meta_model(config: dict) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**config)


def layout(model: torch.nn.Module) -> list[TensorSpec]:
    """Every tensor of the state dict, in its order, with its initialisation (PyTorch's module defaults)."""
    specs, named = [], {}
    for prefix, module in model.named_modules():
        kind = type(module).__name__
        for pname, p in module.named_parameters(recurse=False):
            name = f"{prefix}.{pname}" if prefix else pname
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                fan_in = module.weight.shape[1] * math.prod(module.weight.shape[2:])
                named[name] = TensorSpec(name, tuple(p.shape), "uniform", 1 / math.sqrt(fan_in))
            elif "Norm" in kind and pname in ("weight", "bias"):
                named[name] = TensorSpec(name, tuple(p.shape), "ones" if pname == "weight" else "zeros")
            else:
                raise SvdExportError(f"no initialisation rule for {name} of a {kind}")
    for name in model.state_dict():  # buffers would need a rule of their own; FLUX has none persistent
        if name not in named:
            raise SvdExportError(f"no initialisation rule for the buffer {name}")
        specs.append(named[name])
    return specs


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def tensor_values(spec: TensorSpec, seed: int, device: str = "cpu") -> torch.Tensor:
    """The values the checkpoint holds for `spec` (bf16, on `device`)."""
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=DTYPE, device=device)
    if spec.init == "zeros":
        return torch.zeros(spec.shape, dtype=DTYPE, device=device)
    g = torch.Generator(device=device).manual_seed(tensor_seed(seed, spec.name))
    out = torch.empty(spec.shape, dtype=torch.float32, device=device).uniform_(-spec.bound, spec.bound, generator=g)
    return out.to(DTYPE)


def shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors grouped into shards of at most `max_bytes` (a larger tensor alone in its shard)."""
    groups, size = [[]], 0
    for s in specs:
        if groups[-1] and size + s.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += s.nbytes
    return groups


def header_bytes(group: list[TensorSpec]) -> bytes:
    """The safetensors header of one shard: 8-byte length, then the JSON padded with spaces to 8 bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for s in group:
        header[s.name] = {"dtype": SAFETENSORS_DTYPE[DTYPE], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def write_shard(path: Path, group: list[TensorSpec], seed: int, device: str) -> None:
    with open(path, "wb") as f:
        f.write(header_bytes(group))
        for s in group:
            t = tensor_values(s, seed, device).cpu().contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)  # safetensors is little-endian, as x86 and ARM
            del t


@dataclass
class Written:
    folder: Path
    parameters: int
    bytes: int
    files: list[str]
    seconds: float


def write_checkpoint(config: dict, out: Path, seed: int = 0, device: str = "cpu",
                     max_shard_bytes: int = 5 * 10**9, force: bool = False, log=None) -> Written:
    """Writes the folder `out` (config.json + shards [+ index]); refuses a device or disk that cannot do it."""
    if sys.byteorder != "little":
        raise SvdExportError("this writer emits the host's byte order, and safetensors is little-endian")
    if device == "cuda" and not torch.cuda.is_available():
        raise SvdExportError("--device cuda asked for, but no CUDA GPU is visible")
    if device not in ("cpu", "cuda"):
        raise SvdExportError(f"unknown device {device!r} (choose from cpu, cuda)")
    start = time.perf_counter()
    model = meta_model(config)
    specs = layout(model)
    total = sum(s.nbytes for s in specs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < total * 1.02 + 2**28:
        raise SvdExportError(f"{out.parent} has {free / 1e9:.1f} GB free; this checkpoint needs {total / 1e9:.1f} GB")
    groups = shards(specs, max_shard_bytes)
    names = ([f"{WEIGHTS_NAME}.safetensors"] if len(groups) == 1 else
             [f"{WEIGHTS_NAME}-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    with atomic_dir(out, force) as tmp:
        model.save_config(tmp)  # config.json with _class_name and _diffusers_version, as diffusers writes it
        for name, group in zip(names, groups):
            write_shard(tmp / name, group, seed, device)
            if log:
                log(f"{name}: {len(group)} tensors, {sum(s.nbytes for s in group) / 1e9:.2f} GB "
                    f"({time.perf_counter() - start:.0f} s)")
        # Provenance beside the weights (diffusers ignores it): how to make the same folder again.
        (tmp / PROVENANCE).write_text(json.dumps(provenance(config, seed, device), indent=2, sort_keys=True) + "\n")
        if len(groups) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {s.name: name for name, group in zip(names, groups) for s in group}}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return Written(out, sum(math.prod(s.shape) for s in specs), total, names, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the folder to write (replaced only with --force)")
    ap.add_argument("--preset", default="flux1-40pct", help=f"one of {', '.join(PRESETS)} (default flux1-40pct)")
    ap.add_argument("--double", type=int, help="double-stream blocks (num_layers), overriding the preset's")
    ap.add_argument("--single", type=int, help="single-stream blocks (num_single_layers), overriding the preset's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="where values are drawn: cpu or cuda")
    ap.add_argument("--max-shard-gb", type=float, default=5.0, help="largest shard in GB (10^9 bytes)")
    ap.add_argument("--force", action="store_true", help="replace an existing folder")
    a = ap.parse_args(argv)
    try:
        if a.max_shard_gb <= 0:
            raise SvdExportError("--max-shard-gb must be positive")
        config = config_for(a.preset, a.double, a.single)
        w = write_checkpoint(config, Path(a.out), a.seed, a.device, int(a.max_shard_gb * 1e9), a.force,
                             log=lambda s: print(s, flush=True))
    except SvdExportError as e:
        print(f"svdexport: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"svdexport: error: cannot write {a.out}: {e}", file=sys.stderr)
        return 2
    print(f"{w.folder}: {w.parameters / 1e9:.3f}B parameters, {w.bytes / 1e9:.2f} GB in {len(w.files)} file(s), "
          f"{w.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
