"""FLUX.1-dev's exact config through the project's graphs, torch.export and AOTInductor on this machine
(issue 25, item 4), without materialising its 23.8 GB of weights.

    python scripts/full_depth.py [--jobs final,block] [--out /tmp/svdexport-full-depth] [--time-limit-s 3600]
    python scripts/full_depth.py --jobs embedded-full          # the embedded-constants path at full depth
    python scripts/full_depth.py --jobs embedded-reduced --checkpoint /work/models/flux1-40pct

Each job runs in a child process of its own (its peak RSS is its own; a time limit kills its process group):

- `final`, `block`: FLUX.1-dev's config (19 + 38 blocks) built on the meta device, cast to bf16 and given
  uninitialised CPU storage with `to_empty` (virtual memory: nothing is resident until touched, and nothing
  here touches it), its `FLUX.graphs(model, granularity)` exported with `torch.export.export` (non-strict, as
  the build does) at 1024x1024 (4096 image tokens), 512 text tokens, batch 1, on real CPU example inputs;
  bases random [sites, 3072, 64] float32; coeffs [sites, 1, 4096, 64] float32 and residuals
  [sites, 1, 4096, 3072] bf16 as the full graph returns them (checked against the exported full program's
  outputs). Then both programs are compiled by AOTInductor without constants
  (`aot_inductor.package_constants_in_so=False`), the full package is loaded and the model's parameters bound
  to it by reference (`load_constants(..., check_full_update=True, user_managed=True)`: every constant
  named, nothing copied). At final granularity the cached step (time embedder + output head, 0.1 GB) gets
  random values and its package is run against the eager graph.
- `embedded-full`: the same full graph compiled with its constants embedded (torch's default,
  `package_constants_in_so=True`; over 2 GB torch appends them to the .so and maps them). Impossible on a
  24 GiB machine: AOTInductor first gathers every constant into one zero-filled host buffer (23.8 GB).
- `embedded-reduced`: the package limits where they fit: --double/--single blocks (default 3 + 8: 4.4 GB
  of constants, over 2 GB and over zip's 4 GiB) whose weights are mapped from a checkpoint folder written by
  scripts/make_random_checkpoint.py (file-backed pages: not anonymous memory), compiled with the constants
  in the .so (appended and mapped), then with `package_constants_on_disk_format="binary_blob"` (one blob
  file in the zip); each package loaded and run against eager at 1024x1024.

Every job runs under a cap on its anonymous RSS (--rss-cap-gb) and yields when the machine's available memory
falls below 2 GiB, both watched from the parent (a C call holding the child's GIL cannot delay it): the job
prints every thread's stack into its log and is killed.

Prints one markdown table (wall time, peak RSS and sizes per phase) and writes it with the details as JSON.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_random_checkpoint import FLUX1_DEV, meta_model, tensor_values, layout  # noqa: E402

from svdexport.bench.metrics import rel_l2  # noqa: E402
from svdexport.models.flux import FLUX, FluxShapes  # noqa: E402

JOBS = ("final", "block", "embedded-full", "embedded-reduced")
SHAPES = FluxShapes(batch=1, height=1024, width=1024, text_len=512)
K_MAX = 64
NO_CONSTANTS = {"aot_inductor.package_constants_in_so": False}
EMBEDDED = {"none": NO_CONSTANTS, "so": {"aot_inductor.package_constants_in_so": True},
            "binary_blob": {"aot_inductor.package_constants_in_so": False,
                            "aot_inductor.package_constants_on_disk_format": "binary_blob"}}


def memory_kib(pid: str = "self") -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of a process (KiB)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


MIN_AVAILABLE_GIB = 2.0


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


class Sampler:
    """Samples this process's resident memory every 50 ms for the peak of each phase (the kernel keeps one
    peak per process). Approximate: a long C call that holds the GIL hides its peak from this thread, not
    from the job's exact peak (getrusage) or from the parent's sampling and cap."""

    def __init__(self, on_phase=None):
        self.phase_peak, self.phase, self.on_phase = {}, None, on_phase
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(0.05)
            m = memory_kib()
            if self.phase is not None:
                peak = self.phase_peak[self.phase]
                for k, v in m.items():
                    peak[k] = max(peak.get(k, 0), v)

    @contextmanager
    def measure(self, name: str, record: dict):
        self.phase, self.phase_peak[name] = name, {}
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phase = None
            peak = self.phase_peak[name] or memory_kib()  # a phase shorter than one sample: its end
            record[name] = {"seconds": round(time.perf_counter() - start, 1),
                            "peak_rss_gib": round(peak.get("VmRSS", 0) / 2**20, 2),
                            "peak_anon_gib": round(peak.get("RssAnon", 0) / 2**20, 2),
                            "compiler_peak_rss_gib": round(
                                resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {record[name]}", flush=True)
            if self.on_phase:
                self.on_phase()


# --------------------------------------------------------------------------------------------- models


def flux_config(double: int | None = None, single: int | None = None) -> dict:
    return {**FLUX1_DEV, **({"num_layers": double} if double is not None else {}),
            **({"num_single_layers": single} if single is not None else {})}


def uninitialised(config: dict) -> torch.nn.Module:
    """The transformer in bf16 on CPU storage nobody has written: virtual memory only."""
    model = torch.nn.Module.to(meta_model(config), torch.bfloat16).to_empty(device="cpu")  # nn.Module.to: no warning
    return model.eval().requires_grad_(False)


def mapped(config: dict, folder: Path) -> torch.nn.Module:
    """The transformer with every parameter a view of the checkpoint's bytes (a private mapping: page
    cache, never anonymous memory while only read). The folder may be deeper than the config: its first blocks."""
    import mmap

    model = torch.nn.Module.to(meta_model(config), torch.bfloat16)
    wanted, state = set(model.state_dict()), {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable for frombuffer, file-backed
        size = int.from_bytes(mm[:8], "little")
        header = json.loads(mm[8:8 + size])
        for name, meta in header.items():
            if name in wanted:
                begin, end = meta["data_offsets"]
                t = torch.frombuffer(mm, dtype=torch.bfloat16, count=(end - begin) // 2, offset=8 + size + begin)
                state[name] = t.view(meta["shape"])
    missing = wanted - set(state)
    if missing:
        raise SystemExit(f"{folder} lacks {len(missing)} tensors of this config, e.g. {sorted(missing)[0]}")
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)


def graph_states(config: dict, granularity: str, seed: int = 0, values: bool = True) -> dict[str, torch.Tensor]:
    """Every input of both graphs at SHAPES: the example inputs, bases, a timestep, and C and R of the
    shapes and dtypes the full graph returns; C and R uninitialised unless `values` (export needs only
    their shapes: at block granularity R is 76 sites x 4096 x 3072, 1.9 GB in bf16)."""
    state = FLUX.example_inputs(config, SHAPES, seed, dtype=torch.bfloat16)
    sites = len(FLUX.sites(config, granularity))
    dim = FLUX.hidden_size(config)
    g = torch.Generator().manual_seed(seed + 1)
    state["bases"] = torch.linalg.qr(torch.randn(sites, dim, K_MAX, generator=g))[0]  # orthonormal columns
    state["timestep"] = torch.full((SHAPES.batch,), 0.5, dtype=torch.bfloat16)
    shape = (sites, SHAPES.batch, SHAPES.img_tokens)
    if values:
        state["coeffs"] = torch.randn(*shape, K_MAX, generator=g)
        state["residuals"] = torch.randn(*shape, dim, generator=g).to(torch.bfloat16)
    else:
        state["coeffs"] = torch.empty(*shape, K_MAX)
        state["residuals"] = torch.empty(*shape, dim, dtype=torch.bfloat16)
    return state


def output_shapes(program) -> list[tuple[list[int], str]]:
    node = next(n for n in program.graph.nodes if n.op == "output")
    return [(list(v.meta["val"].shape), str(v.meta["val"].dtype)) for v in node.args[0]]


def package_info(path: Path) -> dict:
    """Size of a .pt2 package, its largest member, and whether the zip needed zip64 records."""
    with zipfile.ZipFile(path) as z:
        members = z.infolist()
        largest = max(members, key=lambda m: m.file_size)
        zip64 = any(m.file_size >= 0xFFFFFFFF or m.header_offset >= 0xFFFFFFFF for m in members)
        return {"bytes": path.stat().st_size, "members": len(members), "largest": largest.filename,
                "largest_bytes": largest.file_size, "needs_zip64": zip64}


def compile_package(program, path: Path, configs: dict) -> dict:
    from torch._inductor import aoti_compile_and_package

    aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    return package_info(path)


# ----------------------------------------------------------------------------------------------- jobs


def job_graphs(a, rec: dict, sampler: Sampler) -> None:
    """`final` / `block`: export and compile both graphs without constants; bind, and run the cached step."""
    from torch._inductor import aoti_load_package

    config, granularity = flux_config(a.double, a.single), a.job
    with sampler.measure("model (meta -> to_empty)", rec["phases"]):
        model = uninitialised(config)
        full, cached = FLUX.graphs(model, granularity)
        state = graph_states(config, granularity, values=granularity == "final")  # final: its cached step runs
    rec["parameters"] = sum(p.numel() for p in model.parameters())
    rec["sites"] = state["bases"].shape[0]
    programs = {}
    for name, graph in (("full", full), ("cached", cached)):
        with sampler.measure(f"export {name}", rec["phases"]):
            programs[name] = torch.export.export(graph, tuple(state[n] for n in graph.input_names), strict=False)
        rec[f"{name}_nodes"] = len(programs[name].graph.nodes)
    want = [(list(state[n].shape), str(state[n].dtype)) for n in ("coeffs", "residuals")]
    rec["full_outputs"] = output_shapes(programs["full"])
    assert rec["full_outputs"][1:] == want, (rec["full_outputs"], want)  # C and R as the cached graph takes them
    for name in ("full", "cached"):
        path = a.out / f"{granularity}-{name}.pt2"
        phase = f"compile {name} (no constants)"
        with sampler.measure(phase, rec["phases"]):
            package = compile_package(programs[name], path, NO_CONSTANTS)
        rec["phases"][phase]["package"] = package
    weight_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    with sampler.measure(f"load full + bind its {weight_gb:.1f} GB by reference", rec["phases"]):
        runner = aoti_load_package(str(a.out / f"{granularity}-full.pt2"))
        runner.load_constants(full.state_dict(), check_full_update=True, user_managed=True)
        rec["full_constants"] = len(runner.get_constant_fqns())
    if granularity == "final":  # the cached step holds 0.1 GB: real values, a real run against eager
        with sampler.measure("cached step: package vs eager", rec["phases"]):
            for spec in layout(cached):
                name = spec.name
                cached.get_parameter(name).copy_(tensor_values(spec, seed=0))
            package = aoti_load_package(str(a.out / "final-cached.pt2"))
            package.load_constants(cached.state_dict(), check_full_update=True, user_managed=True)
            args = [state[n] for n in cached.input_names]
            with torch.inference_mode():
                got, want_out = package(*args), cached(*args)
                got = got[0] if isinstance(got, (list, tuple)) else got
                cached.float()  # the float32 reference: which of the two bf16 results is nearer the truth
                exact = cached(*[x.float() if x.dtype == torch.bfloat16 else x for x in args])
            rec["cached_parity_rel_l2"] = {"package_vs_eager_bf16": rel_l2(got, want_out),
                                           "package_vs_fp32": rel_l2(got, exact),
                                           "eager_bf16_vs_fp32": rel_l2(want_out, exact)}


def job_embedded(a, rec: dict, sampler: Sampler) -> None:
    """`embedded-full` / `embedded-reduced`: the full graph with its constants in the package."""
    from torch._inductor import aoti_load_package

    reduced = a.job == "embedded-reduced"
    config = flux_config(a.double or 3, a.single or 8) if reduced else flux_config(a.double, a.single)
    with sampler.measure("model", rec["phases"]):
        model = mapped(config, a.checkpoint) if reduced else uninitialised(config)
        full, _ = FLUX.graphs(model, "final")
        state = graph_states(config, "final")
    rec["parameters"] = sum(p.numel() for p in model.parameters())
    rec["constant_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    args = tuple(state[n] for n in full.input_names)
    with sampler.measure("export full", rec["phases"]):
        program = torch.export.export(full, args, strict=False)
    want, first = None, None
    for mode in (a.embedded.split(",") if reduced else ["so"]):
        path = a.out / f"{a.job}-{mode}.pt2"
        phase = f"compile full ({mode})"
        with sampler.measure(phase, rec["phases"]):
            package = compile_package(program, path, EMBEDDED[mode])
        rec["phases"][phase]["package"] = package
        if not reduced:
            continue
        if want is None:
            with sampler.measure("eager full step", rec["phases"]), torch.inference_mode():
                want = full(*args)
        with sampler.measure(f"load + run ({mode})", rec["phases"]), torch.inference_mode():
            runner = aoti_load_package(str(path))
            if mode == "none":  # the weights bound by reference: the same kernels, the same bytes
                runner.load_constants(full.state_dict(), check_full_update=True, user_managed=True)
            got = runner(*args)
        del runner
        rec[f"parity_{mode}"] = [rel_l2(g, w) for g, w in zip(got, want)]
        if first is None:
            first = (mode, got)
        else:  # packaging must not change a bit of the result: compare with the first packaging
            rec[f"{mode}_equals_{first[0]}"] = all(torch.equal(g, f) for g, f in zip(got, first[1]))
        path.unlink()  # gigabytes: one package on disk at a time


def child(a) -> int:
    """One job in this process; its record to a.out/JOB.json, written as it goes (a killed job keeps its
    phases so far)."""
    a.out.mkdir(parents=True, exist_ok=True)
    result = a.out / f"{a.job}.json"
    rec = {"job": a.job, "phases": {}, "status": "running"}

    def save() -> None:
        result.write_text(json.dumps(rec, indent=2, default=str) + "\n")

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent's cap or time limit: where it was
    sampler = Sampler(on_phase=save)
    try:
        (job_graphs if a.job in ("final", "block") else job_embedded)(a, rec, sampler)
        rec["status"] = "ok"
    except Exception as e:  # a measurement: what failed, where
        import traceback

        traceback.print_exc()
        rec["status"] = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    rec["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    save()
    return 0 if rec["status"] == "ok" else 1


def run_job(a, job: str) -> dict:
    """The job in a child process, watched from here (a C call holding the child's GIL cannot stop this):
    its peak RSS sampled, and at the anonymous-RSS cap or the time limit its stacks dumped (SIGUSR1) and
    its process group killed, so that no job exhausts the memory others share."""
    argv = [sys.executable, __file__, "--child", job, "--out", str(a.out), "--embedded", a.embedded]
    argv += ["--checkpoint", str(a.checkpoint)] if a.checkpoint else []
    argv += [f"--{k}={getattr(a, k)}" for k in ("double", "single") if getattr(a, k) is not None]
    start, peak, why = time.perf_counter(), {}, None
    with open(a.out / f"{job}.log", "w") as log:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(a.out / "inductor-cache")}  # removed below
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        while proc.poll() is None:
            time.sleep(0.05)
            try:
                m = memory_kib(str(proc.pid))
            except (OSError, ValueError):
                continue
            for k, v in m.items():
                peak[k] = max(peak.get(k, 0), v)
            if m.get("RssAnon", 0) > a.rss_cap_gb * 2**20:
                why = f"killed: anonymous RSS {m['RssAnon'] / 2**20:.1f} GiB passed the cap of {a.rss_cap_gb} GiB"
            elif available_gib() < MIN_AVAILABLE_GIB:  # others' jobs grew: this one yields, not theirs
                why = (f"killed: the machine's available memory fell below {MIN_AVAILABLE_GIB} GiB "
                       f"(this job: {m.get('RssAnon', 0) / 2**20:.1f} GiB anonymous)")
            elif time.perf_counter() - start > a.time_limit_s:
                why = f"killed: time limit {a.time_limit_s:.0f} s"
            if why:
                os.kill(proc.pid, signal.SIGUSR1)  # faulthandler: every thread's stack into the log
                time.sleep(2)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
    code = proc.returncode
    path = a.out / f"{job}.json"
    rec = json.loads(path.read_text()) if path.exists() else {"job": job, "phases": {}}
    if why:
        rec["status"] = why + f" after {time.perf_counter() - start:.0f} s (its stacks: {log.name})"
    elif rec.get("status") in (None, "running"):
        rec["status"] = f"died: {'signal ' + signal.Signals(-code).name if code < 0 else f'exit {code}'}"
    rec["wall_s"] = round(time.perf_counter() - start, 1)
    rec["sampled_peak_gib"] = {k: round(v / 2**20, 2) for k, v in peak.items()}
    shutil.rmtree(a.out / "inductor-cache", ignore_errors=True)  # the .so files: gigabytes when embedded
    return rec


def table(records: list[dict]) -> str:
    lines = ["| job | phase | wall s | peak RSS GiB (anonymous) | compiler peak RSS GiB | package |",
             "|---|---|---|---|---|---|"]
    for r in records:
        for name, p in r["phases"].items():
            pkg = p.get("package")
            out = (f"{pkg['bytes'] / 1e6:,.1f} MB; largest member {pkg['largest_bytes'] / 1e6:,.1f} MB"
                   f"{' (zip64)' if pkg['needs_zip64'] else ''}") if pkg else ""
            lines.append(f"| {r['job']} | {name} | {p['seconds']} | {p['peak_rss_gib']} ({p['peak_anon_gib']}) "
                         f"| {p['compiler_peak_rss_gib']} | {out} |")
        sampled = r.get("sampled_peak_gib", {})
        show = lambda v: (", ".join(f"{k} {x:.1e}" for k, x in v.items()) if isinstance(v, dict)  # noqa: E731
                          else ", ".join(f"{x:.1e}" for x in v) if isinstance(v, list) else v)
        facts = "; ".join(f"{k} {show(r[k])}" for k in ("parameters", "full_nodes", "cached_nodes", "full_constants",
                                                   "cached_parity_rel_l2", "parity_none", "parity_so",
                                                   "parity_binary_blob", "so_equals_none",
                                                   "binary_blob_equals_none") if k in r)
        lines.append(f"| {r['job']} | **{r['status']}** | {r.get('wall_s', '')} | "
                     f"{r.get('peak_rss_gib', sampled.get('VmRSS', ''))} ({sampled.get('RssAnon', '')}) | | {facts} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", default="final,block", help=f"comma list of {', '.join(JOBS)}")
    ap.add_argument("--out", type=Path, default=Path("/tmp/svdexport-full-depth"))
    ap.add_argument("--time-limit-s", type=float, default=3600.0, help="per job")
    ap.add_argument("--rss-cap-gb", type=float, default=8.0, help="anonymous RSS (GiB) at which a job is killed")
    ap.add_argument("--double", type=int, help="double blocks (default: FLUX.1-dev's 19; embedded-reduced: 3)")
    ap.add_argument("--single", type=int, help="single blocks (default: FLUX.1-dev's 38; embedded-reduced: 8)")
    ap.add_argument("--checkpoint", type=Path, help="embedded-reduced: a folder of make_random_checkpoint.py")
    ap.add_argument("--embedded", default="none,so,binary_blob", help="embedded-reduced: the packagings to try "
                    "(none: constants bound by reference, the others' bit-exact reference)")
    ap.add_argument("--json", type=Path, help="write the records here too")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        a.job = a.child
        return child(a)
    jobs = a.jobs.split(",")
    if bad := [j for j in jobs if j not in JOBS]:
        print(f"svdexport: error: unknown job {bad[0]!r} (choose from {', '.join(JOBS)})", file=sys.stderr)
        return 2
    if "embedded-reduced" in jobs and not (a.checkpoint and (a.checkpoint / "config.json").exists()):
        print("svdexport: error: embedded-reduced needs --checkpoint FOLDER (scripts/make_random_checkpoint.py)",
              file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}; {SHAPES}", flush=True)
    records = [run_job(a, job) for job in jobs]
    print(table(records))
    if a.json:
        a.json.write_text(json.dumps({"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
                                      "records": records}, indent=2) + "\n")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
