"""The full-depth row of the GPU check (issue 25, item 5; `scripts/gpu_check.sh --full-depth`, docs/gpu.md).

FLUX.1-dev's config (19 + 38 blocks, 11.9B parameters) with random bf16 weights drawn on the GPU
(scripts/make_random_checkpoint.py --device cuda: nothing downloaded) into a diffusers folder, built with
`svdexport build --weights FOLDER --backend aoti --calib-samples 1` (the CLI, in a child process), then in
one child process, on the same inputs (1024x1024, 512 text tokens, seed 0) and the same scheduler:
the SVD-Cache engine's 50 steps, eager bf16's (the diffusers model called every step) and torch.compile's
of that same model (regional by default: `compile_repeated_blocks`, the blocks compiled once each), with
the peak GPU memory of each. Their ratios come from that one process.

Time (one 10-minute device call, set-up included; estimates for one H100 in ESTIMATES, from REFERENCE.md
sections 6-7: eager 50 steps 12.3 s, torch.compile 8.2 s; the flux1-reduced aoti build took 153 s cold on an
H200, its Triton kernels are the same at full depth, only the wrapper grows): the AOTInductor probe runs
beside the checkpoint's writing; the build gets what is left after the measurement's reserve; in the
measurement the engine goes first (the headline), eager second (its baseline), torch.compile last, and a
phase whose estimate no longer fits is a row saying so.

AOTInductor CUDA packages segfaulted in their loader on the last lent image (docs/gpu.md): a 0.05 GB probe
package is loaded in a child first; if it dies the engine is built with the inductor backend instead, and if
the aoti engine's own load kills the measurement, the row says so and the measurement is run again with
the inductor engine when the budget allows, else without an engine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS.parent))
sys.path.insert(0, str(SCRIPTS))

# Seconds per phase on one H100 (and on the CPU for the tiny plan); a phase starts only if it fits.
# checkpoint: 23.8 GB drawn on the GPU, written to the page cache (disk speed unknown); build: load, hash and
# calibrate (1 x 50 steps), export, compile (Triton kernels as flux1-reduced's, a wrapper 28x larger);
# engine: load, a warm-up and a timed 50-step run; eager: 12.3 s per 50 steps, twice with the draw; regional
# compile: about 10 s (diffusers' documentation for FLUX) plus 2 + 50 steps at 8.2 s.
ESTIMATES = {"checkpoint": 60, "build:aoti": 300, "build:inductor": 120, "engine:aoti": 60, "engine:inductor": 180,
             "eager": 30, "compile:regional": 45, "compile:full": 150}
PARITY_BF16 = 2e-2  # rel. L2 of one bf16 step against eager bf16 (as gpu_check.TOLERANCE)
TINY_ESTIMATES = {"checkpoint": 10, "build:aoti": 120, "build:inductor": 60, "engine:aoti": 20,
                  "engine:inductor": 60, "eager": 10, "compile:regional": 60, "compile:full": 90}


@dataclass
class FullDepthPlan:
    preset: str = "flux1-dev"
    device: str = "cuda"
    shapes: dict = field(default_factory=lambda: {"height": 1024, "width": 1024, "text_len": 512})
    steps: int = 50
    backend: str = "aoti"
    fallback: str | None = "inductor"  # when the aoti probe or the aoti engine's load dies
    probe: bool = True  # the AOTInductor probe package first (CUDA)
    calib_samples: int = 1
    compile: str = "regional"  # torch.compile of the diffusers model: "regional" (repeated blocks) or "full"
    budget_s: float = 540.0  # the row, set-up excluded (gpu_check.sh passes what its set-up left)
    seed: int = 0
    estimates: dict = field(default_factory=lambda: dict(ESTIMATES))

    def estimate(self, phase: str) -> float:
        return self.estimates[phase]


FULL_DEPTH = FullDepthPlan()
TINY_FULL_DEPTH = FullDepthPlan(preset="tiny", device="cpu", shapes={"height": 64, "width": 64, "text_len": 16},
                                probe=False, budget_s=900.0, estimates=dict(TINY_ESTIMATES))


@dataclass
class MethodRow:
    method: str  # "SVD-Cache engine (aoti)", "eager bf16", "torch.compile (regional)"
    skipped: str | None = None  # why it was not measured
    seconds: float | None = None  # `steps` steps, the sampling loop, synchronized
    full_steps: int | None = None
    prepare_s: float | None = None  # engine load / weights drawn on the device / compile (first steps)
    peak_allocated_gib: float | None = None  # GPU: torch.cuda.max_memory_allocated; CPU: peak RSS
    peak_reserved_gib: float | None = None
    device_used_gib: float | None = None  # GPU: growth of the device's used memory, held at the method's end
    # One full step against the eager diffusers forward (rel. L2): the image tokens entering the output head
    # (the engine's C V^T + R at final granularity), which the check bounds; and the model output, whose
    # modulated output norm eager bf16 itself rounds by a few percent with random weights (full_depth.md).
    feature_parity: float | None = None
    output_parity: float | None = None
    latents_vs_eager: float | None = None  # rel. L2 of the final latents against eager's


def fits(plan: FullDepthPlan, phase: str, remaining_s: float) -> str | None:
    """Why `phase` does not start with `remaining_s` seconds left; None when it fits."""
    need = plan.estimate(phase)
    return None if need <= remaining_s else f"time budget: {remaining_s:.0f} s left, {phase} needs about {need} s"


# ------------------------------------------------------------------------------------------- the parent


PROBE_LIMIT_S = 150  # the probe's package builds in about 30 s and loads in seconds; its own load limit is 120 s


def died(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"


def kill_group(proc: subprocess.Popen) -> None:
    """The child this row started, with its own children (its process group, made for it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class Runner:
    """The row's child processes (each replaceable in tests): the probe, the checkpoint, the build, the
    measurement. Each returns (exit code, what it said last)."""

    def __init__(self, plan: FullDepthPlan, out: Path, log=print):
        self.plan, self.out, self.log = plan, out, log

    def _run(self, argv: list[str], timeout: float) -> tuple[int, str]:
        """`argv` in a process group of its own, killed whole at `timeout` (compile workers included)."""
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            text = proc.communicate(timeout=max(timeout, 1))[0].strip()
        except subprocess.TimeoutExpired:
            kill_group(proc)
            return -signal.SIGKILL, f"killed at its time limit of {timeout:.0f} s"
        if proc.returncode:
            self.log(text[-3000:])
        return proc.returncode, (text.splitlines() or [""])[-1][:300]

    def probe(self, timeout: float) -> subprocess.Popen:
        """Started in the background: packages 0.05 GB of Linear layers and loads them in a grandchild."""
        return subprocess.Popen([sys.executable, str(SCRIPTS / "experiments" / "aoti_cuda_probe.py"), "0.05"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def checkpoint(self, folder: Path, timeout: float) -> tuple[int, str]:
        """The random checkpoint, or the one an earlier run of the same plan left (23.8 GB: never two on disk)."""
        from make_random_checkpoint import PROVENANCE, config_for, provenance

        p = self.plan
        made = folder / PROVENANCE
        if made.exists() and json.loads(made.read_text()) == json.loads(json.dumps(
                provenance(config_for(p.preset), p.seed, p.device))):
            return 0, f"reused {folder}"
        shutil.rmtree(folder, ignore_errors=True)  # this row's own folder, of another plan
        return self._run([sys.executable, str(SCRIPTS / "make_random_checkpoint.py"), str(folder), "--preset",
                          p.preset, "--device", p.device, "--seed", str(p.seed)],
                         timeout)

    def build(self, weights: Path, backend: str, engine: Path, timeout: float, check_memory: bool) -> tuple[int, str]:
        p = self.plan
        argv = [sys.executable, "-c", "import sys; from svdexport.cli import main; sys.exit(main(sys.argv[1:]))",
                "build", "--weights", str(weights), "--backend", backend, "--dtype", "bf16", "--device", p.device,
                "--out", str(engine), "--graphs", str(engine.parent / f"{engine.name}-graphs"),
                "--calib-samples", str(p.calib_samples), "--force"]
        argv += [f"--{k.replace('_', '-')}={v}" for k, v in p.shapes.items()]
        return self._run(argv + ([] if check_memory else ["--no-memory-check"]), timeout)

    def measure(self, spec: Path, timeout: float) -> tuple[int, str]:
        return self._run([sys.executable, __file__, "--measure", str(spec)], timeout)


def run_row(plan: FullDepthPlan, out: Path, log=print, runner: Runner | None = None) -> dict:
    """The whole row; returns its record (phases, build, method rows)."""
    runner = runner or Runner(plan, out, log)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    remaining = lambda: plan.budget_s - (time.perf_counter() - start)  # noqa: E731
    rec = {"plan": dataclasses.asdict(plan), "phases": {}, "notes": [], "rows": []}

    def phase(name: str, began: float, status: str) -> None:
        rec["phases"][name] = {"seconds": round(time.perf_counter() - began, 1), "status": status}
        log(f"{name}: {status} ({rec['phases'][name]['seconds']} s)")

    backend = plan.backend
    began = probe_start = time.perf_counter()
    probe = runner.probe(PROBE_LIMIT_S) if plan.probe and backend == "aoti" else None
    weights = out / "weights"
    code, said = runner.checkpoint(weights, remaining())
    phase("checkpoint", began, "ok" if code == 0 else f"failed ({died(code)}): {said}")
    if probe is not None:
        began = time.perf_counter()
        try:
            wait = min(PROBE_LIMIT_S - (time.perf_counter() - probe_start),
                       remaining() - plan.estimate("build:inductor"))
            said = probe.communicate(timeout=max(wait, 1))[0].strip()
            ok = probe.returncode == 0 and said.endswith("load+run ok")
            status = "ok" if ok else f"failed ({died(probe.returncode)}): {said.splitlines()[-1][:200] if said else ''}"
        except subprocess.TimeoutExpired:
            kill_group(probe)
            status = "failed: did not finish in time"
        phase("aoti probe", began, status)
        if status != "ok" and plan.fallback:
            rec["notes"].append(f"aoti probe {status}: built with {plan.fallback} instead")
            backend = plan.fallback
    if code != 0:
        rec["rows"] = [dataclasses.asdict(MethodRow(m, skipped="no checkpoint")) for m in method_names(plan, None)]
        return rec
    rows, engine_skipped = None, None
    while True:
        engine = out / f"engine-{backend}"
        began, built, why = time.perf_counter(), False, engine_skipped
        if why is None:
            why = fits(plan, f"build:{backend}", remaining() - reserve_for(plan, backend))
        if why is None:
            timeout = remaining() - reserve_for(plan, backend)
            code, said = runner.build(weights, backend, engine, timeout, True)
            if code == 2 and "GiB" in said and "available" in said:  # the estimate refused it: measure instead
                rec["notes"].append(f"{backend} build refused by the memory estimate ({said}); "
                                    "built with --no-memory-check")
                code, said = runner.build(weights, backend, engine, timeout, False)
            built = code == 0
            why = None if built else f"build failed ({died(code)}): {said}"
            phase(f"build {backend}", began, why or "ok")
        elif engine_skipped is None:
            phase(f"build {backend}", began, f"skipped: {why}")
        rec["build"] = {"backend": backend, "seconds": rec["phases"].get(f"build {backend}", {}).get("seconds"),
                        "ok": built}
        code, said, rows = measure_once(plan, runner, out, weights, backend, engine if built else None, why,
                                        remaining(), phase)
        engine_row = rows[0] if rows else None
        died_ = code not in (0, 1) or not rows  # 1: a row failed and says why; the others were measured
        if not died_ or not built or (engine_row and engine_row["seconds"] is not None):
            break
        # The engine's load or run killed the measurement (the aoti loader segfaulted on the last image).
        engine_skipped = f"failed: the process died ({died(code)}) in the {backend} engine's load or run"
        rec["notes"].append(f"the {backend} engine's measurement died ({died(code)}): {said}")
        if plan.fallback and backend != plan.fallback and \
                fits(plan, f"build:{plan.fallback}", remaining() - reserve_for(plan, plan.fallback)) is None:
            backend, engine_skipped = plan.fallback, None
    rec["rows"] = rows or [dataclasses.asdict(MethodRow(m, skipped=f"failed: the measurement died ({died(code)})"))
                           for m in method_names(plan, backend)]
    rec["backend"] = backend
    rec["seconds"] = round(time.perf_counter() - start, 1)
    return rec


def reserve_for(plan: FullDepthPlan, backend: str) -> float:
    """What the measurement needs after a build: the engine and its eager baseline (torch.compile may be skipped)."""
    return plan.estimate(f"engine:{backend}") + plan.estimate("eager")


def measure_once(plan: FullDepthPlan, runner: Runner, out: Path, weights: Path, backend: str, engine: Path | None,
                 engine_skipped: str | None, budget_s: float, phase) -> tuple[int, str, list[dict]]:
    """One measurement child; its rows (those it saved before dying, if it died)."""
    began = time.perf_counter()
    spec, result = out / "measure.json", out / "measure.result.json"
    result.unlink(missing_ok=True)
    spec.write_text(json.dumps({"plan": dataclasses.asdict(plan), "weights": str(weights),
                                "engine": str(engine) if engine else None, "backend": backend,
                                "engine_skipped": engine_skipped, "budget_s": budget_s, "result": str(result)}))
    code, said = runner.measure(spec, budget_s)
    rows = json.loads(result.read_text())["rows"] if result.exists() else []
    status = "ok" if code == 0 else f"failed ({died(code)}): {said}"
    phase(f"measure ({backend if engine else 'no engine'})", began, status)
    return code, said, rows


def method_names(plan: FullDepthPlan, backend: str | None) -> list[str]:
    return [f"SVD-Cache engine ({backend or plan.backend})", "eager bf16", f"torch.compile ({plan.compile})"]


def parity_bound(rows: list[dict]) -> float:
    """The bf16 bound, or twice torch.compile's own distance from eager if larger: at 57 blocks a fused
    compiled model rounds differently from eager, and the engine is one such model."""
    compiled = next((r["feature_parity"] for r in rows if r["method"].startswith("torch.compile")), None)
    return max(PARITY_BF16, 2 * compiled) if compiled is not None else PARITY_BF16


def parity(x: float | None, bound: float) -> str:
    return "-" if x is None else f"{x:.1e} ({'ok' if x <= bound else 'FAILED'})"


def ok(rec: dict) -> bool:
    """Every method measured, and each within the parity bound of eager."""
    bound = parity_bound(rec["rows"])
    return all(not r["skipped"] and r["seconds"] is not None
               and (r["feature_parity"] is None or r["feature_parity"] <= bound) for r in rec["rows"])


def _f(x, fmt: str) -> str:
    return "-" if x is None else fmt.format(x)


def table(rec: dict, device_name: str) -> str:
    """The row's markdown table: one line per method, ratios against eager and torch.compile."""
    p = rec["plan"]
    rows = rec["rows"]
    by = {r["method"].split(" ")[0]: r for r in rows}
    eager, compiled = by.get("eager", {}).get("seconds"), by.get("torch.compile", {}).get("seconds")
    mem = ("peak allocated GiB | peak reserved GiB (device used at the end)" if p["device"] == "cuda"
           else "peak RSS GiB (process) | -")
    bound = parity_bound(rows)
    lines = [f"FLUX.1 {p['preset']} config, random bf16 weights, {p['shapes']}, {p['steps']} steps on {device_name}; "
             + "; ".join(f"{k} {v['seconds']:.0f} s ({v['status']})" for k, v in rec["phases"].items()),
             "",
             f"| method | {p['steps']} steps s | vs eager | vs torch.compile | full steps | load / compile s "
             f"| {mem} | step vs eager: head input (output) rel. L2 "
             "| final latents vs eager (rel. L2) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["skipped"] or r["seconds"] is None:
            why = r["skipped"] or "not measured: the measurement ended before it"
            lines.append(f"| {r['method']} | skipped: {why} |" + " |" * 8)
            continue
        s = r["seconds"]
        device = "" if r.get("device_used_gib") is None else f" ({r['device_used_gib']:.1f})"
        lines.append(f"| {r['method']} | {s:.2f} | {_f(eager and eager / s, '{:.2f}x')} "
                     f"| {_f(compiled and compiled / s, '{:.2f}x')} | {_f(r['full_steps'], '{}')}/{p['steps']} "
                     f"| {_f(r['prepare_s'], '{:.0f}')} | {_f(r['peak_allocated_gib'], '{:.1f}')} "
                     f"| {_f(r['peak_reserved_gib'], '{:.1f}')}{device} | {parity(r['feature_parity'], bound)} "
                     f"({_f(r['output_parity'], '{:.1e}')}) "
                     f"| {_f(r['latents_vs_eager'], '{:.1e}')} |")
    lines += [f"\nnote: {n}" for n in rec["notes"]]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- the measurement


def measure(spec_path: Path) -> int:
    """The child: engine, eager and torch.compile in this one process, each row saved as soon as it is done."""
    from gpu_full_depth_measure import Measurement

    return Measurement(json.loads(Path(spec_path).read_text())).run()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        sys.exit(measure(Path(sys.argv[2])))
    sys.exit("usage: scripts/gpu_check.sh --full-depth (this module is its full-depth row)")
