"""The check to run on a lent GPU (scripts/gpu_check.sh sets up its packages, then runs this).

Builds FLUX.1's full width (bundled:flux1-reduced) at 1024x1024 in bf16 with each backend (aoti, inductor, tensorrt,
onnx on the CUDA / TensorRT providers), checks one full and one cached step of each against eager bf16, and
prints one markdown table: full and cached step, 50 steps with SVD-Cache against eager without cache,
achieved TFLOP/s and fraction of this GPU's bf16 matmul peak (measured in the same run), peak GPU memory,
build time. A backend that cannot run (package missing, no time left in the budget) is a row with its reason.
For the backends in the plan's `lora` (tensorrt on the GPU: TensorRT refit), a LoRA step follows: a random
PEFT LoRA loaded into the built engine (timed), its steps against eager with the same LoRA fused, unloaded
(timed) back to the base output bit for bit; a second table.

`--full-depth` runs only the full-depth row instead (scripts/gpu_full_depth.py): FLUX.1-dev's config with
random weights drawn on the GPU, its default SVD-Cache engine against eager bf16 and torch.compile of the same
diffusers model, 50 steps at 1024x1024, with peak GPU memory; a table of its own.

`--tiny` runs the same logic on a CPU with the bundled digits model and the CPU backends (aoti in bf16 as on
the GPU, onnx in fp32), so the first GPU run is not the first run of this code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_full_depth.py, the --full-depth row

import svdexport  # noqa: E402
from svdexport import hardware  # noqa: E402
from svdexport.bench import roofline  # noqa: E402
from svdexport.bench.metrics import rel_l2  # noqa: E402
from svdexport.builder.build import BuildOptions, build  # noqa: E402
from svdexport.errors import SvdExportError  # noqa: E402
from svdexport.export import backend  # noqa: E402

# Parity bound per dtype (rel. L2 of one step's output against eager in the same dtype): bf16 kernels fused
# differently round differently; float32 engines agree to about 1e-6 (REFERENCE.md section 5).
TOLERANCE = {"bfloat16": 2e-2, "float16": 2e-2, "float32": 1e-3}
QUANTIZED_TOLERANCE = 1e-1  # rel. L2 of a quantized engine's step against eager in the build dtype (int8/fp8 error)


def row_engine(name: str) -> tuple[str, str]:
    """(backend, --quantize) of a row: "aoti", or "aoti+fp8" for a quantized engine of that backend."""
    backend_name, _, scheme = name.partition("+")
    return backend_name, scheme or "none"


@dataclass
class Plan:
    weights: str
    shapes: dict
    device: str
    backends: tuple[str, ...]
    dtypes: dict[str, str]  # per backend; "auto": what `svdexport build` picks
    calib_samples: int = 1
    calib_steps: int = 2
    steps: int = 50
    step_calls: int = 5  # timed calls per step measurement (median)
    budget_s: float = 480.0  # the whole check, builds included; a backend that would not fit is skipped
    reserve_s: float = 90.0  # time a backend needs at least (build and measurement) to be started
    lora: tuple[str, ...] = ()  # backends whose row gets the LoRA step
    lora_reserve_s: float = 90.0  # time the LoRA step needs at least (two loads of the base weights, two pushes)


# inductor (torch.compile at load) second: a compiled GPU row even where AOTInductor's loader crashes.
# The LoRA step on the GPU for tensorrt (the refit no CPU test reaches); aoti and onnx take it on the CPU
# (--tiny), and on the GPU with --lora-backends (each costs two loads of the base weights).
# aoti+fp8 last (issue 27): torchao's fp8 (int8 on GPUs before compute capability 8.9) beside the bf16 rows.
GPU = Plan("bundled:flux1-reduced", {"height": 1024, "width": 1024}, "cuda",
           ("aoti", "inductor", "tensorrt", "onnx", "aoti+fp8"),
           {"aoti": "bf16", "inductor": "bf16", "tensorrt": "bf16", "onnx": "bf16", "aoti+fp8": "bf16"},
           lora=("tensorrt",))
# On a CPU: aoti in bf16 as on the GPU (the digits model's own default is fp32), onnx as `build` picks (fp32:
# ONNX Runtime's CPU provider has no bf16 kernels).
TINY = Plan("bundled:digits", {}, "cpu", ("aoti", "onnx"), {"aoti": "bf16", "onnx": "auto"}, budget_s=300.0,
            reserve_s=5.0, lora=("aoti", "onnx"), lora_reserve_s=5.0)


@dataclass
class Row:
    backend: str
    dtype: str = ""
    skipped: str | None = None  # why the backend was not run
    parity: dict = field(default_factory=dict)  # rel. L2 of the full and cached step against eager
    parity_ok: bool | None = None
    full_ms: float | None = None
    cached_ms: float | None = None
    cached_50_s: float | None = None  # SVD-Cache, plan steps
    eager_uncached_50_s: float | None = None  # eager in the same dtype, every step full
    speedup: float | None = None
    tflops: float | None = None
    fraction_of_peak: float | None = None
    peak_memory_gib: float | None = None
    build_s: float | None = None
    lora: dict = field(default_factory=dict)  # the LoRA step's timings and checks (`lora_step`)
    lora_skipped: str | None = None  # why the LoRA step did not run or failed


def unavailable(name: str, device: str) -> str | None:
    """Why a backend (or a quantized row, "aoti+fp8") cannot run here, in one line; None when it can."""
    name, scheme = row_engine(name)
    try:
        backend(name).check()
        if scheme != "none":
            BuildOptions(backend=name, quantize=scheme, device=device).validate()
    except SvdExportError as e:
        return str(e)
    if name == "onnx" and device == "cuda":
        from svdexport.export.onnx import providers

        if "CUDAExecutionProvider" not in providers():
            return "onnxruntime has no CUDA provider here (pip install onnxruntime-gpu)"
    return None


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device: str, calls: int) -> float:
    times = []
    for _ in range(calls):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_state(engine, reference) -> dict:
    """One mid-schedule step's inputs, C and R from the reference's full step."""
    state = {**engine.example_inputs(0), "bases": engine.sampler.bases}
    state["timestep"] = engine.sampling.model_timestep(torch.tensor(500.0, device=engine.device),
                                                        state["hidden_states"])
    with torch.inference_mode():
        _, state["coeffs"], state["residuals"] = reference.full(*[state[n] for n in reference.full.input_names])
    return state


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_out"]  # proj_out: in both graphs (tests/helpers.py)


def make_lora(engine, path: Path, rank: int = 4, scale: float = 0.5, seed: int = 0) -> Path:
    """A random rank-`rank` LoRA of the engine's FLUX transformer, saved as diffusers saves LoRAs: PEFT names
    it on a meta-device model (nothing allocated: FLUX.1's width need not be loaded for it) and the values
    are seeded, A and B uniform as nn.Linear's init, B scaled by `scale` (so B @ A moves the adapted weights
    by about `scale` times their own init scale)."""
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from svdexport.models.weights import config_kwargs

    with torch.device("meta"):
        model = engine.family.transformer_class().from_config(config_kwargs(engine.config))
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=LORA_TARGETS))
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, meta in sorted(get_peft_model_state_dict(model).items()):
        bound = 1 / meta.shape[1] ** 0.5  # nn.Linear's: 1/sqrt(fan_in)
        value = (torch.rand(meta.shape, generator=g) * 2 - 1) * bound
        state[key] = (value * (scale if "lora_B" in key else 1.0)).to(getattr(torch, engine.manifest.dtype))
    path.parent.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(path.parent, transformer_lora_layers=state, weight_name=path.name)
    return path


def lora_step(engine, state: dict, lora: Path, device: str, scale: float = 1.0) -> dict:
    """Loads `lora` into the built engine (timed with the first full step after it, which pays a CUDA-graph
    recapture), compares its full and cached steps with eager running the same fused weights (the engine's
    eager twin), unloads it (timed likewise) and compares the steps with the base ones bit for bit."""
    full_args = [state[n] for n in engine.full.input_names]
    cached_args = [state[n] for n in engine.cached.input_names]
    base, base_c = engine.full(*full_args)[0].clone(), engine.cached(*cached_args).clone()
    sync(device)
    start = time.perf_counter()
    engine.load_lora(lora, scale)
    got = engine.full(*full_args)[0]
    sync(device)
    load_s = time.perf_counter() - start
    weights = engine.lora_weights()
    got_c = engine.cached(*cached_args)
    twin = engine.eager_reference()  # eager PyTorch with the LoRA fused the same way
    want = twin.full(*[state[n] for n in twin.full.input_names])[0]
    want_c = twin.cached(*[state[n] for n in twin.cached.input_names])
    del twin
    sync(device)
    start = time.perf_counter()
    engine.unload_lora()
    back = engine.full(*full_args)[0]
    sync(device)
    unload_s = time.perf_counter() - start
    back_c = engine.cached(*cached_args)
    tol = TOLERANCE[engine.manifest.dtype]
    result = {"load_s": load_s, "unload_s": unload_s, "weights": weights,
              "parity": {"full": rel_l2(got, want), "cached": rel_l2(got_c, want_c)},
              "change": rel_l2(got, base),  # how far the LoRA moves the step: parity means something above tol
              "exact_unload": bool(torch.equal(back, base) and torch.equal(back_c, base_c))}
    result["ok"] = max(result["parity"].values()) <= tol < result["change"] and result["exact_unload"]
    return result


class Memory:
    """Peak memory of what runs after it is made. GPU: the larger of PyTorch's peak allocation and the growth
    of the device's used memory (ONNX Runtime's arena is not PyTorch's), over what was held at the start.
    CPU: the process's peak resident memory, builds included (the kernel keeps no resettable peak)."""

    def __init__(self, device: str):
        self.device = device
        if device == "cuda":
            import gc

            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.allocated, self.used = torch.cuda.memory_allocated(), self._used()

    @staticmethod
    def _used() -> int:
        free, total = torch.cuda.mem_get_info()
        return total - free

    def peak_gib(self) -> float:
        if self.device != "cuda":
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
        return max(torch.cuda.max_memory_allocated() - self.allocated, self._used() - self.used) / 2**30


class Check:
    """Runs the plan: per backend a build, a parity check and the timings; eager references per dtype."""

    def __init__(self, plan: Plan, out: Path, log=print, isolate: bool = False):
        self.plan, self.out, self.log, self.isolate = plan, out, log, isolate
        self.start = time.perf_counter()
        self.refs: dict[str, dict] = {}  # dtype -> eager engine, its timings, FLOPs and the matmul peak

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def reference(self, engine) -> dict:
        """Eager in the engine's dtype: its uncached generation, the step FLOPs and the peak, once per dtype."""
        key = engine.manifest.dtype
        if key not in self.refs:
            eager = engine.eager_reference()
            state = step_state(eager, eager)
            inputs = eager.example_inputs(0)
            with torch.inference_mode():
                eager.generate(inputs, steps=2, interval=1)  # warm-up
                uncached = median_seconds(lambda: eager.generate(inputs, steps=self.plan.steps, interval=1),
                                          self.plan.device, 1)
                full_ms = median_seconds(lambda: eager.full(*[state[n] for n in eager.full.input_names]),
                                         self.plan.device, self.plan.step_calls) * 1e3
            flops = roofline.count_flops(eager.full, [state[n] for n in eager.full.input_names])
            peak = roofline.engine_peak(engine, 3)
            self.refs[key] = {"eager": eager, "state": state, "uncached_s": uncached, "flops": flops,
                              "peak": peak, "full_ms": full_ms}
            self.log(f"eager {key}: {self.plan.steps} steps uncached {uncached:.3f} s, full step {full_ms:.2f} ms, "
                     f"{flops / 1e9:.1f} GFLOP; {peak.dtype} matmul peak {peak.flops_per_s / 1e12:.2f} TFLOP/s")
        return self.refs[key]

    def run_backend(self, name: str) -> Row:
        p = self.plan
        reason = unavailable(name, p.device)
        if reason is None and self.elapsed() + p.reserve_s > p.budget_s:
            reason = f"time budget: {self.elapsed():.0f} s of {p.budget_s:.0f} s spent before it could start"
        if reason is not None:
            return Row(name, skipped=reason)
        backend_name, scheme = row_engine(name)
        opts = BuildOptions(weights=p.weights, backend=backend_name, dtype=p.dtypes.get(name, "auto"), device=p.device,
                            shapes=dict(p.shapes), quantize=scheme,
                            calib_samples=p.calib_samples, calib_steps=p.calib_steps)
        start = time.perf_counter()
        build(opts, self.out / name, graphs_dir=self.out / f"{name}-graphs", progress=False)
        row = Row(name, dtype=opts.dtype, build_s=time.perf_counter() - start)
        self.log(f"{name}: built in {row.build_s:.0f} s ({opts.dtype}: {opts.dtype_reason})")
        ref = self.reference(svdexport.load(self.out / name))
        eager, state = ref["eager"], ref["state"]
        memory = Memory(p.device)  # from here on: the engine's own memory, the eager reference's excluded
        engine = svdexport.load(self.out / name)
        with torch.inference_mode():
            full_args = [state[n] for n in engine.full.input_names]
            cached_args = [state[n] for n in engine.cached.input_names]
            got, want = engine.full(*full_args), eager.full(*[state[n] for n in eager.full.input_names])
            got_c, want_c = engine.cached(*cached_args), eager.cached(*[state[n] for n in eager.cached.input_names])
            row.parity = {"full": rel_l2(got[0], want[0]), "cached": rel_l2(got_c, want_c)}
            tol = TOLERANCE[engine.manifest.dtype] if scheme == "none" else QUANTIZED_TOLERANCE
            row.parity_ok = max(row.parity.values()) <= tol
            engine.full(*full_args), engine.cached(*cached_args)  # warm-up (CUDA-graph capture, lazy init)
            full_s = median_seconds(lambda: engine.full(*full_args), p.device, p.step_calls)
            cached_s = median_seconds(lambda: engine.cached(*cached_args), p.device, p.step_calls)
            inputs = engine.example_inputs(0)
            engine.generate(inputs, steps=p.steps)  # warm-up of the whole loop
            row.cached_50_s = median_seconds(lambda: engine.generate(inputs, steps=p.steps), p.device, 2)
        row.full_ms, row.cached_ms = full_s * 1e3, cached_s * 1e3
        row.eager_uncached_50_s = ref["uncached_s"]
        row.speedup = ref["uncached_s"] / row.cached_50_s
        row.tflops = ref["flops"] / full_s / 1e12
        row.fraction_of_peak = ref["flops"] / full_s / ref["peak"].flops_per_s
        row.peak_memory_gib = memory.peak_gib()
        self.log(f"{name}: parity {row.parity} ({'ok' if row.parity_ok else 'FAILED'}), full {row.full_ms:.2f} ms, "
                 f"cached {row.cached_ms:.2f} ms, {p.steps} steps {row.cached_50_s:.3f} s")
        if name in p.lora:
            self.run_lora(engine, state, row)
        return row

    def run_lora(self, engine, state: dict, row: Row) -> None:
        """The LoRA step into `row`; a failure there is the row's LoRA result, not the end of the row."""
        p = self.plan
        if self.elapsed() + p.lora_reserve_s > p.budget_s:
            row.lora_skipped = f"time budget: {self.elapsed():.0f} s of {p.budget_s:.0f} s spent before it"
            return
        try:
            # Made again for each row (cheap: nothing allocated), so a file of another model left in --out
            # by an earlier run is never reused; seeded, so every backend of a run gets the same LoRA.
            lora = make_lora(engine, self.out / f"{row.backend}-lora" / "lora.safetensors")
            with torch.inference_mode():
                row.lora = lora_step(engine, state, lora, p.device)
        except SvdExportError as e:
            row.lora_skipped = f"failed: {e}"
        except Exception as e:
            traceback.print_exc()
            row.lora_skipped = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        self.log(f"{row.backend}: LoRA {row.lora or row.lora_skipped}")

    def run(self) -> list[Row]:
        return [self.run_isolated(name) if self.isolate else self.run_one(name) for name in self.plan.backends]

    def run_isolated(self, name: str) -> Row:
        """`run_one` in a child process: a backend that crashes the interpreter (an AOTInductor package
        segfaulted in aoti_load_package on an H200, docs/gpu.md) is a row saying so, and the others still run."""
        result = self.out / f"{name}.row.json"
        result.unlink(missing_ok=True)
        budget = max(self.plan.budget_s - self.elapsed(), 0.0)
        argv = [sys.executable, __file__, "--child", name, "--out", str(self.out), "--budget-s", f"{budget:.0f}",
                "--json", str(result), "--lora-backends", ",".join(self.plan.lora) or "none"]
        argv += ["--tiny"] if self.plan.device == "cpu" else []
        code = subprocess.run(argv).returncode
        if not result.exists():
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
            return Row(name, skipped=f"failed: the process died ({how}) before it reported; its log is above")
        saved = json.loads(result.read_text())
        for dtype, peak in saved["peaks"].items():
            self.refs.setdefault(dtype, {"peak": hardware.Peak(**{**peak, "shape": tuple(peak["shape"])})})
        return Row(**saved["rows"][0])

    def run_one(self, name: str) -> Row:
        try:
            return self.run_backend(name)
        except SvdExportError as e:  # a build or load refused in one line: the others still run
            return Row(name, skipped=f"failed: {e}")
        except Exception as e:  # a first run on a new machine: record it, keep the other backends
            traceback.print_exc()
            return Row(name, skipped=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")


def _f(x, fmt: str) -> str:
    return "-" if x is None else fmt.format(x)


def table(rows: list[Row], plan: Plan, device_name: str, peaks: dict) -> str:
    """The one markdown table the check prints (docs/gpu.md shows its layout)."""
    mem = "peak GPU memory GiB" if plan.device == "cuda" else "peak RSS GiB"
    lines = [f"{plan.weights} {plan.shapes or 'default shapes'} on {device_name}; {plan.steps} steps; "
             + "; ".join(f"{d} matmul peak {p.flops_per_s / 1e12:.2f} TFLOP/s at {'x'.join(map(str, p.shape))}"
                         for d, p in peaks.items()),
             "",
             f"| backend | dtype | parity vs eager (full / cached rel. L2) | full step ms | cached step ms "
             f"| {plan.steps} steps SVD-Cache s | eager uncached s | speedup | TFLOP/s | % of peak | {mem} | build s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.backend} | skipped: {r.skipped} |" + " |" * 10)
            continue
        ok = "ok" if r.parity_ok else "FAILED"
        lines.append(
            f"| {r.backend} | {r.dtype} | {r.parity['full']:.1e} / {r.parity['cached']:.1e} ({ok}) "
            f"| {_f(r.full_ms, '{:.2f}')} | {_f(r.cached_ms, '{:.2f}')} | {_f(r.cached_50_s, '{:.3f}')} "
            f"| {_f(r.eager_uncached_50_s, '{:.3f}')} | {_f(r.speedup, '{:.2f}x')} | {_f(r.tflops, '{:.3f}')} "
            f"| {_f(r.fraction_of_peak and r.fraction_of_peak * 100, '{:.0f}%')} | {_f(r.peak_memory_gib, '{:.2f}')} "
            f"| {_f(r.build_s, '{:.0f}')} |")
    return "\n".join(lines)


def lora_table(rows: list[Row]) -> str:
    """The LoRA step's table (rows that have one): load and unload seconds, parity against eager with the
    same LoRA fused, how far the LoRA moved the step, and whether unloading gave the base step back exactly."""
    lines = ["| backend | LoRA load s | unload s | parity vs eager fused (full / cached rel. L2) "
             "| change from base (rel. L2) | unload bit-exact |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r.lora_skipped:
            lines.append(f"| {r.backend} | {r.lora_skipped} |" + " |" * 4)
        elif r.lora:
            x = r.lora
            lines.append(f"| {r.backend} | {x['load_s']:.2f} | {x['unload_s']:.2f} | {x['parity']['full']:.1e} / "
                         f"{x['parity']['cached']:.1e} ({'ok' if x['ok'] else 'FAILED'}) | {x['change']:.2e} "
                         f"| {'yes' if x['exact_unload'] else 'NO'} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    native, why = hardware.cpu_bf16()
    return f"CPU, {torch.get_num_threads()} threads ({why})"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the same logic on a CPU: bundled digits, aoti and onnx")
    ap.add_argument("--out", default="/tmp/svdexport-gpu-check", help="folder for the engines it builds")
    ap.add_argument("--backends", help="comma list (default: aoti,inductor,tensorrt,onnx,aoti+fp8; --tiny: aoti,onnx); "
                    "BACKEND+SCHEME is a quantized engine (aoti+int8 on a CPU, aoti+fp8 on a GPU)")
    ap.add_argument("--budget-s", type=float, help="seconds the whole check may take (default 480; --tiny 300)")
    ap.add_argument("--json", help="also write the rows (and the measured matmul peaks) as JSON")
    ap.add_argument("--lora-backends", help="comma list of backends that get the LoRA step, or 'none' "
                    "(default: tensorrt; --tiny: aoti,onnx)")
    ap.add_argument("--in-process", action="store_true", help="run the backends in this process, not one child each")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # one backend, for the parent's run_isolated
    ap.add_argument("--full-depth", action="store_true", help="only the full-depth row: FLUX.1-dev's config, "
                    "random weights drawn on the GPU, its SVD-Cache engine against eager and torch.compile "
                    "(gpu_full_depth.py)")
    ap.add_argument("--compile", choices=("regional", "full"), help="--full-depth: torch.compile of the whole "
                    "model or of its repeated blocks (default regional: each block type compiled once)")
    ap.add_argument("--preset", help="--full-depth: the checkpoint preset (default flux1-dev; --tiny: tiny)")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.full_depth:
        return full_depth(a)
    plan = TINY if a.tiny else GPU
    if a.backends or a.child:
        plan = dataclasses.replace(plan, backends=tuple((a.child or a.backends).split(",")))
    if a.budget_s is not None:
        plan = dataclasses.replace(plan, budget_s=a.budget_s)
    if a.lora_backends is not None:
        plan = dataclasses.replace(plan, lora=() if a.lora_backends == "none" else tuple(a.lora_backends.split(",")))
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("svdexport: error: no CUDA GPU is visible (use --tiny to run this check on a CPU)", file=sys.stderr)
        return 2
    isolate = not (a.in_process or a.child)
    check = Check(plan, Path(a.out), log=lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", flush=True),
                  isolate=isolate)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    rows = check.run()
    peaks = {k: v["peak"] for k, v in check.refs.items()}
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": [r.__dict__ for r in rows],
                                            "peaks": {k: p.to_dict() for k, p in peaks.items()}}, indent=2) + "\n")
    if a.child:
        return 0
    print()
    print(table(rows, plan, device_name(plan.device), peaks))
    if lora := lora_table(rows):
        print(f"\nLoRA (random, rank 4, {', '.join(LORA_TARGETS)}):\n\n{lora}")
    print(f"\ntotal {check.elapsed():.0f} s")
    failed = [r for r in rows if (r.skipped or "").startswith("failed") or (not r.skipped and not r.parity_ok)
              or (r.lora_skipped or "").startswith("failed") or (r.lora and not r.lora["ok"])]
    return 1 if failed else 0


def full_depth_plan(a: argparse.Namespace):
    """The full-depth row's plan from the command line (`--tiny`: the same logic on this CPU, tiny preset)."""
    from gpu_full_depth import FULL_DEPTH, TINY_FULL_DEPTH

    plan = TINY_FULL_DEPTH if a.tiny else FULL_DEPTH
    changes = {"budget_s": a.budget_s, "compile": a.compile, "preset": a.preset}
    plan = dataclasses.replace(plan, **{k: v for k, v in changes.items() if v is not None})
    if a.backends:  # one backend: no probe, no fallback (--backends inductor skips AOTInductor altogether)
        plan = dataclasses.replace(plan, backend=a.backends.split(",")[0], fallback=None, probe=False)
    return plan


def full_depth(a: argparse.Namespace) -> int:
    from gpu_full_depth import ok, run_row, table as full_depth_table

    plan = full_depth_plan(a)
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("svdexport: error: no CUDA GPU is visible (use --tiny to run this check on a CPU)", file=sys.stderr)
        return 2
    log = lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", flush=True)  # noqa: E731
    rec = run_row(plan, Path(a.out) / "full-depth", log=log)
    if a.json:
        Path(a.json).write_text(json.dumps(rec, indent=2) + "\n")
    print()
    print(full_depth_table(rec, device_name(plan.device)))
    print(f"\ntotal {rec['seconds']:.0f} s")
    return 0 if ok(rec) else 1


if __name__ == "__main__":
    sys.exit(main())
