"""The measurement of the full-depth row (scripts/gpu_full_depth.py runs it as a child process): the SVD-Cache
engine, eager bf16 and torch.compile of the same diffusers model, in this one process, on the same inputs and
scheduler, one after the other (each method's memory freed before the next, so each peak is its own).

Order: the engine first (the headline, and the risky AOTInductor load: if it kills this process, the rows
saved so far survive), then eager (the baseline), then torch.compile (which compiles the eager model in
place). Each row is written to the result file as soon as it is measured.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import resource
import time
import traceback
from pathlib import Path

import torch

from gpu_full_depth import FullDepthPlan, MethodRow, fits, method_names
from make_random_checkpoint import config_for, layout, meta_model, tensor_values


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, object]:
    sync(device)
    begin = time.perf_counter()
    value = fn()
    sync(device)
    return time.perf_counter() - begin, value


def fresh_peaks(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def device_used(device: str) -> float:
    """GiB in use on the GPU by anyone (memory outside PyTorch's allocator included); 0 on a CPU."""
    if device != "cuda":
        return 0.0
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def peaks(device: str) -> tuple[float, float | None]:
    """(peak allocated, peak reserved) GiB since fresh_peaks on a GPU; the process's peak RSS on a CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, None


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def random_model(config: dict, seed: int, device: str) -> torch.nn.Module:
    """The checkpoint's model drawn again on `device` from the same per-tensor generators (bit-identical to
    the folder written with the same --device and seed: checked on a few tensors by `check_against`)."""
    model = torch.nn.Module.to(meta_model(config), torch.bfloat16).to_empty(device=device)  # nn.Module.to: no warning
    with torch.no_grad():
        for spec in layout(model):
            model.get_parameter(spec.name).copy_(tensor_values(spec, seed, device))
    return model.eval().requires_grad_(False)


def check_against(model: torch.nn.Module, folder: Path) -> None:
    from safetensors import safe_open

    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"] \
        if (folder / "diffusion_pytorch_model.safetensors.index.json").exists() else None
    for name in ("x_embedder.weight", "proj_out.weight", "transformer_blocks.0.attn.to_q.weight"):
        file = folder / (index[name] if index else "diffusion_pytorch_model.safetensors")
        with safe_open(str(file), framework="pt") as f:
            if not torch.equal(f.get_tensor(name), model.get_parameter(name).detach().cpu()):
                raise RuntimeError(f"the model drawn again differs from {file} at {name}")


class Measurement:
    def __init__(self, spec: dict):
        self.spec = spec
        self.plan = FullDepthPlan(**spec["plan"])
        self.device = self.plan.device
        self.start = time.perf_counter()
        names = method_names(self.plan, spec["backend"])
        self.rows = {n.split(" ")[0]: MethodRow(n) for n in names}
        from svdexport.models.flux import FLUX, FluxShapes

        self.family, self.config = FLUX, config_for(self.plan.preset)
        self.shapes = FluxShapes(**self.plan.shapes)
        self.sampling = FLUX.sampling(FLUX.family_sampler(self.config))
        inputs = FLUX.example_inputs(self.config, self.shapes, self.plan.seed, dtype=torch.bfloat16)
        self.inputs = {k: v.to(self.device) for k, v in inputs.items()}
        self.timestep = self.sampling.model_timestep(torch.tensor(500.0), self.inputs["hidden_states"])
        self.reference = {}  # "step": the engine's full step (output, head input); "eager_step"; final latents
        self.captured: list | None = None

    def remaining(self) -> float:
        return self.spec["budget_s"] - (time.perf_counter() - self.start)

    def save(self) -> None:
        Path(self.spec["result"]).write_text(json.dumps({"rows": [dataclasses.asdict(r) for r in self.rows.values()]},
                                                        indent=2) + "\n")

    def run(self) -> int:
        self.save()
        failed = False
        for key, phase, fn in (("SVD-Cache", f"engine:{self.spec['backend']}", self.engine),
                               ("eager", "eager", self.eager), ("torch.compile", f"compile:{self.plan.compile}",
                                                                 self.compiled)):
            row = self.rows[key]
            if key == "SVD-Cache" and not self.spec["engine"]:
                row.skipped = self.spec.get("engine_skipped") or "no engine"
            elif key == "torch.compile" and self.rows["eager"].seconds is None:
                row.skipped = "needs the eager model (not measured)"
            elif (why := fits(self.plan, phase, self.remaining())) is not None:
                row.skipped = why
            else:
                try:
                    fresh_peaks(self.device)
                    self.used0 = device_used(self.device)
                    fn(row)
                    row.peak_allocated_gib, row.peak_reserved_gib = peaks(self.device)
                    if row.device_used_gib is None and self.device == "cuda":
                        row.device_used_gib = device_used(self.device) - self.used0
                except Exception as e:  # a measurement: the row says what failed, the others still run
                    traceback.print_exc()
                    row.skipped, failed = f"failed: {type(e).__name__}: {str(e).strip()[:200]}", True
            self.save()
        return 1 if failed else 0

    def compare(self, row: MethodRow, step: tuple) -> None:
        (out, feature), (want, want_feature) = step, self.reference["eager_step"]
        row.output_parity = rel(out, want)
        row.feature_parity = None if feature is None or want_feature is None else rel(feature, want_feature)

    def denoise(self, model, steps: int) -> torch.Tensor:
        """FluxPipeline's loop over the diffusers model: the engine's scheduler and timesteps, every step full."""
        scheduler = self.sampling.scheduler()
        timesteps = self.sampling.set_timesteps(scheduler, steps, self.shapes)
        latents = self.inputs["hidden_states"]
        with torch.inference_mode():
            for t in timesteps:
                kwargs = self.family.forward_kwargs({**self.inputs, "hidden_states": latents},
                                                    self.sampling.model_timestep(t, latents))
                latents = scheduler.step(model(**kwargs)[0], t, latents, return_dict=False)[0]
        return latents

    def step(self, model) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One full step of the diffusers model: (output, the image tokens entering norm_out)."""
        self.captured = []
        with torch.inference_mode():
            out = model(**self.family.forward_kwargs(self.inputs, self.timestep))[0]
        feature, self.captured = (self.captured or [None])[0], None
        return out.cpu(), None if feature is None else feature.cpu()

    def capture(self, module, args) -> None:  # norm_out's forward pre-hook, active only inside `step`
        if self.captured is not None:
            self.captured.append(args[0].detach().clone())

    def engine(self, row: MethodRow) -> None:
        import svdexport

        row.prepare_s, engine = timed(lambda: svdexport.load(self.spec["engine"]), self.device)
        state = {**self.inputs, "bases": engine.sampler.bases, "timestep": self.timestep}
        with torch.inference_mode():
            out, coeffs, residuals = engine.full(*[state[n] for n in engine.full.input_names])
            feature = None
            if engine.manifest.cache.granularity == "final":  # its one site is the head's input: C V^T + R
                from svdexport.cache.svd import reconstruct

                feature = reconstruct(coeffs.float(), residuals.float(), state["bases"].float())[0].cpu()
            self.reference["step"] = out.cpu(), feature
            engine.generate(self.inputs, steps=self.plan.steps)  # warm-up: CUDA-graph capture, lazy init
            row.seconds, result = timed(lambda: engine.generate(self.inputs, steps=self.plan.steps), self.device)
        row.full_steps = result.full_steps
        self.reference["engine"] = result.latents.cpu()
        if self.device == "cuda":  # before close: an AOTInductor engine may hold memory outside PyTorch's allocator
            row.device_used_gib = device_used(self.device) - self.used0
        engine.close()

    def eager(self, row: MethodRow) -> None:
        row.prepare_s, self.model = timed(lambda: random_model(self.config, self.plan.seed, self.device), self.device)
        check_against(self.model, Path(self.spec["weights"]))
        self.model.norm_out.register_forward_pre_hook(self.capture)
        self.reference["eager_step"] = self.step(self.model)
        if "step" in self.reference:
            self.compare(self.rows["SVD-Cache"], self.reference["step"])
        self.denoise(self.model, 2)  # warm-up
        row.seconds, latents = timed(lambda: self.denoise(self.model, self.plan.steps), self.device)
        row.full_steps, row.feature_parity, row.output_parity = self.plan.steps, 0.0, 0.0
        if "engine" in self.reference:
            self.rows["SVD-Cache"].latents_vs_eager = rel(self.reference["engine"], latents)
        self.reference["eager"] = latents.cpu()

    def compiled(self, row: MethodRow) -> None:
        model = self.model
        if self.plan.compile == "regional" and hasattr(model, "compile_repeated_blocks"):
            model.compile_repeated_blocks(fullgraph=True)  # diffusers: each repeated block compiled once
        else:
            row.method = "torch.compile (full)"
            model = torch.compile(model, fullgraph=True)
        row.prepare_s, _ = timed(lambda: self.denoise(model, 2), self.device)  # the compile, with 2 steps
        self.compare(row, self.step(model))
        row.seconds, latents = timed(lambda: self.denoise(model, self.plan.steps), self.device)
        row.full_steps = self.plan.steps
        row.latents_vs_eager = rel(latents, self.reference["eager"])
