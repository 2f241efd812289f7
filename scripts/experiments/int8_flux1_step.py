"""Issue 27, items 1-3: one FLUX.1-width full step (bundled:flux1-reduced, 256x256, 64 text tokens: 320 tokens,
hidden 3072, 2+2 blocks) compiled several ways, timed side by side in one process (interleaved rounds, medians),
with the bf16 and int8 matmul peaks measured in the same run.

Variants (pick with --variants, comma-separated):
  eager-bf16              the eager full graph in bf16 (what a CPU user runs)
  aoti-bf16               the shipping bf16 aoti engine: constants not in the package, bound at load
  aoti-bf16-freeze        + Inductor freezing (oneDNN linear on prepacked weights: derived constants)
  aoti-bf16-cpp           + max_autotune over CPP,ATEN (Inductor's CPU GEMM templates; prepacked weights)
  aoti-bf16-cpp-freeze    both
  aoti-int8-pt2e          PT2E X86InductorQuantizer, dynamic per-tensor activations, per-channel weights,
                          fp32 model (int8-mixed-fp32), freezing; conditioning GEMVs kept
  aoti-int8-pt2e-bf16     the same quantized from the bf16 model (int8-mixed-bf16)
  aoti-int8-pt2e-all      PT2E on every linear (conditioning GEMVs too)
  aoti-int8-torchao       torchao int8 dynamic (per-row activations), bf16 model, unwrapped, no freezing
  inductor-*              the same through torch.compile (the inductor backend), e.g. inductor-bf16,
                          inductor-bf16-cpp-freeze, inductor-int8-pt2e, inductor-int8-torchao

Every compiled variant is loaded as an engine would load it (svdexport/export/derived.py): its package holds no
constants; the program's own tensors are bound by FQN (user-managed, no copy) and the derived ones (prepacked
weights that freezing made) are made again at load from their recorded recipes; the report gives the bytes
bound, made at load, and kept as tensors (what the engine's own constants file would hold).

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/experiments/int8_flux1_step.py --variants eager-bf16,aoti-bf16
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import re
import statistics
import sys
import time
import warnings
import zipfile
from pathlib import Path

import torch

from svdexport import hardware
from svdexport.bench.roofline import count_flops
from svdexport.export import gemm_path
from svdexport.export import quantize as qz
from svdexport.models import family
from svdexport.models.family import Shapes

sys.path.insert(0, str(Path(__file__).parent))
from int8_peak import int8_peak  # noqa: E402

warnings.filterwarnings("ignore")
GEMM_CALLS = re.compile(r"aoti_torch_cpu_[a-z_0-9]*(?:mm|linear)[a-z_0-9]*|CppMicroGemm[A-Za-z0-9]+|"
                        r"torch\.ops\.onednn\.[a-z_]+|torch\.ops\.mkldnn\.[a-z_]+|extern_kernels\.[a-z_]*mm|"
                        r"torch\.ops\.aten\._int_mm|cpp_fused_[a-z_0-9]*micro_gemm")


def graph_and_args(dtype: torch.dtype, shapes: Shapes, k: int = 64):
    fam = family("flux")
    info = fam.inspect("bundled:flux1-reduced")
    model = fam.load_weights(info, dtype).model.eval().requires_grad_(False)
    full, _ = fam.graphs(model, "final")
    x = fam.example_inputs(info.config, shapes, 0, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    d = fam.hidden_size(info.config)
    x["bases"] = torch.linalg.qr(torch.randn(len(fam.sites(info.config, "final")), d, d, generator=g))[0][..., :k]
    x["bases"] = x["bases"].contiguous()
    x["timestep"] = torch.full((shapes.batch,), 0.5, dtype=dtype)
    return full, tuple(x[n] for n in full.input_names)


def nbytes(t: torch.Tensor) -> int:
    if t.layout == torch._mkldnn:
        return torch.ops.mkldnn._nbytes(t)
    return t.numel() * t.element_size()


def aoti(name: str, program, configs: dict, captured=None, scratch: Path = Path("/tmp")):
    """An AOTInductor package of `program` as an engine would build and load it (svdexport/export/derived.py):
    no constants in the package; at load the program's constants bound by FQN, the derived ones (prepacked
    or folded weights) made again from them by their recorded recipes, all bound by internal name."""
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    from svdexport.export import derived

    path = scratch / f"{name}.pt2"
    own = {**program.state_dict, **program.constants}
    start = time.perf_counter()
    with torch.no_grad(), derived.capture(own) as made:  # Inductor freezes only without grad
        aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    seconds = time.perf_counter() - start
    package = aoti_load_package(str(path))
    if configs.get("aot_inductor.package_constants_in_so"):
        return package, {"compile_s": round(seconds, 1), "package_bytes": path.stat().st_size,
                         "gemm": sorted(set(GEMM_CALLS.findall(_code(path))))}
    recipes = json.loads(json.dumps(made.recipes))  # as the engine's file would hold them
    start = time.perf_counter()
    rebuilt = {**derived.replay(recipes, own), **made.unrecipted}
    replay_s = time.perf_counter() - start
    names = derived.constant_names(path, scratch / f"{name}.so")
    package.keep = derived.bind_by_name(package, names, own, rebuilt)
    used = {names[n] for n in names if n not in rebuilt}
    info = {"compile_s": round(seconds, 1), "package_bytes": path.stat().st_size,
            "bound_bytes": sum(nbytes(own[f]) for f in used if f in own),
            "recipes": len(recipes), "replay_s": round(replay_s, 1),
            "made_at_load_bytes": sum(nbytes(t) for n, t in rebuilt.items() if n not in made.unrecipted),
            "kept_tensors_bytes": sum(nbytes(t) for t in made.unrecipted.values()),
            "gemm": gemm_path.gemm_paths(_code(path)) + sorted(set(GEMM_CALLS.findall(_code(path))))[:3]}
    return package, info


def _code(path: Path) -> str:
    z = zipfile.ZipFile(path)
    return "".join(z.read(n).decode(errors="ignore") for n in z.namelist() if n.endswith(".cpp"))


def compiled(name: str, module, args, configs: dict):
    import torch._inductor.config as ic
    from torch._inductor.utils import run_and_get_code

    configs = {k: v for k, v in configs.items() if not k.startswith("aot_inductor.")}
    fn = torch.compile(module, fullgraph=True)
    start = time.perf_counter()
    with ic.patch(configs), torch.no_grad():
        _, code = run_and_get_code(fn, *args)
    code = "".join(code)
    info = {"compile_s": round(time.perf_counter() - start, 1),
            "gemm": gemm_path.gemm_paths(code) + sorted(set(GEMM_CALLS.findall(code)))[:3]}

    def run(*a):
        with ic.patch(configs), torch.no_grad():
            return fn(*a)
    return run, info


def make(variant: str, ctx: dict, scratch: Path):
    """(callable, its args, info) of one variant."""
    kind, _, rest = variant.partition("-")
    bf16 = ctx["bf16"]
    if variant == "eager-bf16":
        return bf16["graph"], bf16["args"], {}
    gemm = "cpp" if "cpp" in rest else "aten"
    if rest.startswith("bf16"):
        configs = qz.inductor_configs(None, gemm)
        if "freeze" in rest:
            configs["freezing"] = True
        module, args = bf16["graph"], bf16["args"]
        program = torch.export.export(module, args, strict=False) if kind == "aoti" else None
    elif rest.startswith("int8-pt2e"):
        src = bf16 if "pt2e-bf16" in rest else ctx["fp32"]()
        kept = [] if "-all" in rest else ctx["kept"]
        scheme = qz.QuantScheme("int8", qz.PT2E_X86, "per-tensor, dynamic", kept=kept)
        start = time.perf_counter()
        module = qz.quantize_pt2e(src["graph"], src["args"], qz.exported_module_names(kept, "transformer"))
        quant_s = time.perf_counter() - start
        args = src["args"]
        configs = qz.inductor_configs(scheme, gemm)
        if "autocast" in rest:  # int8-mixed-bf16: the quantized fp32 graph traced under bf16 autocast
            with torch.autocast("cpu", dtype=torch.bfloat16):
                program = torch.export.export(module, args, strict=False)
            module = program.module()
        else:
            program = torch.export.export(module, args, strict=False) if kind == "aoti" else None
    elif rest.startswith("int8-torchao"):
        scheme = qz.QuantScheme("int8", qz.TORCHAO_INT8, "per-row, dynamic", kept=ctx["kept"])
        module = ctx["bf16_copy"]()["graph"]
        start = time.perf_counter()
        qz.quantize_torchao(module.transformer, scheme)
        quant_s = time.perf_counter() - start
        args = bf16["args"]
        configs = qz.inductor_configs(None, gemm)
        program = torch.export.export(module, args, strict=False) if kind == "aoti" else None
    else:
        raise SystemExit(f"unknown variant {variant}")
    if rest.endswith("-inso"):  # the package holds its constants (compiled in), nothing bound at load
        configs["aot_inductor.package_constants_in_so"] = True
    if kind == "aoti":
        fn, info = aoti(variant, program, configs, None, scratch)
    else:
        fn, info = compiled(variant, module, args, configs)
    if "quant_s" in locals():
        info["quantize_s"] = round(quant_s, 1)
    return fn, args, info


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="eager-bf16,aoti-bf16")
    p.add_argument("--scratch", default="/tmp/int8w/step")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    scratch = Path(a.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    shapes = family("flux").shapes({"height": 256, "width": 256, "text_len": 64})
    print(f"{hardware.describe_cpu()}; torch threads {torch.get_num_threads()}; load {os.getloadavg()}", flush=True)
    graph16, args16 = graph_and_args(torch.bfloat16, shapes)
    ctx = {"bf16": {"graph": graph16, "args": args16}}
    fp32 = []  # one fp32 model for every PT2E variant (PT2E quantizes an exported copy of the graph)
    ctx["fp32"] = lambda: fp32[0] if fp32 else fp32.append(dict(zip(("graph", "args"),
                                                                       graph_and_args(torch.float32, shapes)))) or fp32[0]
    ctx["bf16_copy"] = lambda: dict(zip(("graph", "args"), graph_and_args(torch.bfloat16, shapes)))
    # The conditioning GEMVs: linears that see one row per sample in a real call (names in the transformer).
    ctx["kept"] = [n.removeprefix("transformer.") for n in qz.conditioning_linears(graph16, args16, shapes.batch)]
    print(f"kept in bf16 ({len(ctx['kept'])} linears): {ctx['kept']}", flush=True)
    flops = count_flops(graph16, args16)
    with torch.inference_mode():
        ref = graph16(*args16)[0].float()
    runs, infos = {}, {}
    for v in a.variants.split(","):
        fn, args, info = make(v, ctx, scratch)
        with torch.inference_mode():
            out = fn(*args)
        out = out[0] if isinstance(out, (tuple, list)) else out
        info["rel_l2_vs_eager_bf16"] = round(float((out.float() - ref).norm() / ref.norm()), 4)
        info["peak_rss_gb_so_far"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)
        runs[v], infos[v] = (fn, args), info
        print(v, info, flush=True)
    peaks = {"bf16": [], "int8": []}
    times = {v: [] for v in runs}
    mm_shapes = hardware.flux_shapes(320, 3072, "cpu")
    with torch.inference_mode():
        for _ in range(a.rounds):  # interleaved: each variant once per round, and the peaks
            for v, (fn, args) in runs.items():
                start = time.perf_counter()
                fn(*args)
                times[v].append(time.perf_counter() - start)
            peaks["bf16"].append(hardware.matmul_peak(torch.bfloat16, "cpu", mm_shapes, 3).flops_per_s)
            peaks["int8"].append(int8_peak(mm_shapes, 3).flops_per_s)
    bf16_peak, i8_peak = max(peaks["bf16"]), max(peaks["int8"])
    base = statistics.median(times["aoti-bf16"]) if "aoti-bf16" in times else None
    eager = statistics.median(times["eager-bf16"]) if "eager-bf16" in times else None
    print(f"\nfull step {flops / 1e9:.1f} GFLOP; bf16 peak {bf16_peak / 1e12:.3f} TFLOP/s, int8 peak "
          f"{i8_peak / 1e12:.3f} TOPS (best of the rounds); load at the end {os.getloadavg()}")
    print("| variant | ms (median) | min | aoti-bf16 / this | same, median of per-round ratios | eager-bf16 / this |"
          " of bf16 peak | of int8 peak |")
    print("|---|---|---|---|---|---|---|---|")
    paired = {v: statistics.median(b / t for b, t in zip(times["aoti-bf16"], ts)) for v, ts in times.items()} \
        if "aoti-bf16" in times else {}
    for v, ts in times.items():
        med = statistics.median(ts)
        rate = flops / med
        print(f"| {v} | {med * 1e3:.0f} | {min(ts) * 1e3:.0f} | {base / med if base else float('nan'):.2f}x | "
              f"{paired.get(v, float('nan')):.2f}x | "
              f"{eager / med if eager else float('nan'):.2f}x | {rate / bf16_peak:.0%} | {rate / i8_peak:.0%} |")


if __name__ == "__main__":
    main()
