"""Issue 13, item 4: is ONNX Runtime's dynamic int8 worth a `--quantize int8` at FLUX.1 width? One full step of
bundled:flux1-reduced (256x256, 64 text tokens; 1.03B parameters) side by side in one process: eager bf16 (what
a CPU user runs), the fp32 onnx engine, and its full graph quantized by onnxruntime.quantization (ORT's
pre-processing, then quantize_dynamic: QInt8 weights, MatMuls with a constant weight only), each against
eager fp32 (rel. L2 of the noise prediction).

    svdexport build --weights FLUX1_FOLDER --backend onnx --dtype fp32 --height 256 --width 256 --text-len 64 \\
        --calib-samples 1 --calib-steps 2 --out ENGINE
    PYTHONPATH=. python scripts/experiments/int8_flux1_width.py ENGINE SCRATCH

Result (2026-11-27, idle 2-core Zen 4, AVX512-VNNI and AVX512-BF16, no AMX), in docs/precision.md (int8).
"""
import statistics
import sys
import time
from pathlib import Path

import torch

import svdexport
from svdexport.export.onnx import OrtGraph


def quantized(engine_dir: Path, scratch: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre, out = scratch / "full.pre.onnx", scratch / "full.int8.onnx"
    if not out.exists():
        quant_pre_process(str(engine_dir / "full.onnx"), str(pre), skip_symbolic_shape=True, save_as_external_data=True,
                          all_tensors_to_one_file=True, external_data_location="full.pre.onnx.data")
        quantize_dynamic(pre, out, weight_type=QuantType.QInt8, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
    return out


def main(engine_dir: str, scratch: str) -> None:
    engine = svdexport.load(engine_dir)
    int8 = OrtGraph(quantized(Path(engine_dir), Path(scratch)), engine.manifest.graphs["full"].inputs)
    fp32 = engine.eager_reference()
    bf16 = engine.eager_reference(torch.bfloat16)
    state = {**engine.example_inputs(0), "bases": engine.sampler.bases}
    state["timestep"] = engine.sampling.model_timestep(torch.tensor(500.0), state["hidden_states"])

    def args(graph, dtype=None):
        return [state[n].to(dtype) if dtype and state[n].is_floating_point() and n not in ("rotary_cos", "rotary_sin")
                else state[n] for n in graph.input_names]

    runs = {"eager fp32": (fp32.full, args(fp32.full)), "eager bf16": (bf16.full, args(bf16.full, torch.bfloat16)),
            "onnx fp32 engine": (engine.full, args(engine.full)), "onnx int8": (int8, args(engine.full))}
    times = {k: [] for k in runs}
    with torch.inference_mode():
        outs = {k: fn(*a)[0].float() for k, (fn, a) in runs.items()}  # warm-up and outputs
        for _ in range(3):  # interleaved
            for k, (fn, a) in runs.items():
                start = time.perf_counter()
                fn(*a)
                times[k].append(time.perf_counter() - start)
    ref, bf16_ms = outs["eager fp32"], statistics.median(times["eager bf16"]) * 1e3
    print(f"{engine_dir}: one full step, medians of 3 interleaved runs")
    print("| graph | ms | eager bf16 / this | rel. L2 vs eager fp32 |")
    print("|---|---|---|---|")
    for k in runs:
        ms = statistics.median(times[k]) * 1e3
        err = float((outs[k] - ref).norm() / ref.norm())
        print(f"| {k} | {ms:.0f} | {bf16_ms / ms:.2f}x | {err:.4f} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
