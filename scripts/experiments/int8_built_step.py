"""Speed gate of issue 27 with CLI-built engines: the full step of the int8 aoti engine against the bf16 aoti
engine of the same weights (bundled:flux1-reduced, 256x256, 64 text tokens), side by side in one process,
interleaved rounds, medians, one OpenMP thread; the bf16 matmul peak measured in the same rounds.

    S="--weights bundled:flux1-reduced --height 256 --width 256 --text-len 64 --calib-samples 1 --calib-steps 2"
    svdexport build --backend aoti --quantize int8 --out ROOT/int8 --graphs ROOT/g-int8 $S
    svdexport build --backend aoti --dtype bf16 --out ROOT/bf16 --graphs ROOT/g-bf16 $S
    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/experiments/int8_built_step.py ROOT [ROUNDS]
"""
import os
import statistics
import sys
import time

import torch
import svdexport
from svdexport import hardware
from svdexport.bench.latency import engine_gemm_path, graph_call, step_state

root = sys.argv[1]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
print(f"{hardware.describe_cpu()}; torch threads {torch.get_num_threads()}; load {os.getloadavg()}", flush=True)
engines = {n: svdexport.load(f"{root}/{n}") for n in ("bf16", "int8")}
for n, e in engines.items():
    print(n, e.manifest.dtype, engine_gemm_path(e), flush=True)
calls = {}
with torch.inference_mode():
    for n, e in engines.items():
        state = step_state(e, e)  # C and R from the engine's own full step
        calls[n] = graph_call(e.full, state, e.manifest.graphs["full"].input_dtypes)
        calls[n](); calls[n]()  # warm-up
    ref = calls["bf16"]()[0].float()
    out = calls["int8"]()[0].float()
    print(f"int8 full-step output vs bf16 engine's, rel L2 {float((out - ref).norm() / ref.norm()):.4f}")
    times = {n: [] for n in calls}
    peaks = []
    shapes = hardware.flux_shapes(320, 3072, "cpu")
    for r in range(rounds):
        for n, fn in calls.items():
            t = time.perf_counter(); fn(); times[n].append(time.perf_counter() - t)
        peaks.append(hardware.matmul_peak(torch.bfloat16, "cpu", shapes, 3).flops_per_s)
        print(f"round {r}: " + ", ".join(f"{n} {times[n][-1]*1e3:.0f} ms" for n in times), flush=True)
med = {n: statistics.median(v) for n, v in times.items()}
paired = statistics.median(b / i for b, i in zip(times["bf16"], times["int8"]))
print(f"medians: bf16 {med['bf16']*1e3:.0f} ms, int8 {med['int8']*1e3:.0f} ms: int8 is {med['bf16']/med['int8']:.2f}x "
      f"the bf16 engine's full step (paired per-round median {paired:.2f}x); bf16 peak {max(peaks)/1e12:.2f} TFLOP/s; "
      f"load at the end {os.getloadavg()}")
