"""One full step and one cached step of an engine against its eager reference (same weights, bases and
inputs), and optionally against an fp32 engine of the same model: how far a backend or a dtype moves the
output. Prints max |difference| / output scale and relative L2 per output, and the step times.

    .venv/bin/python scripts/check_parity.py engines/flux1-reduced-aoti-bf16 --fp32 engines/flux1-reduced-aoti-fp32
"""

import argparse
import time

import torch

import svdexport

p = argparse.ArgumentParser()
p.add_argument("engine")
p.add_argument("--fp32", help="an fp32 engine of the same model: its eager reference is the ground truth too")
p.add_argument("--seed", type=int, default=1)
a = p.parse_args()


def agreement(x: torch.Tensor, ref: torch.Tensor) -> str:
    x, ref = x.float(), ref.float()
    return f"max|d|/scale {float((x - ref).abs().max() / ref.abs().max()):.2e}, rel L2 {float((x - ref).norm() / ref.norm()):.2e}"


def one_step(engine, graphs, state):
    args = [state[n] for n in graphs.input_names]
    start = time.perf_counter()
    with torch.inference_mode():
        out = graphs(*args)
    return out, time.perf_counter() - start


engine = svdexport.load(a.engine)
eager = engine.eager_reference()
inputs = engine.example_inputs(a.seed)
# Scheduler timestep 370 in the family's model convention (FLUX: / 1000; HunyuanVideo: as is).
state = {**inputs, "bases": engine.sampler.bases,
         "timestep": engine.sampling.model_timestep(torch.tensor(370.0), inputs["hidden_states"])}
want, t_eager = one_step(eager, eager.full, state)
got, t_engine = one_step(engine, engine.full, state)
for name, x, ref in zip(engine.full.output_names, got, want):
    print(f"full step {name}: {agreement(x, ref)}")
print(f"full step: eager {t_eager:.3f} s, engine {t_engine:.3f} s ({t_engine / t_eager:.2f}x)")
state["coeffs"], state["residuals"] = want[1], want[2]
want_c, _ = one_step(eager, eager.cached, state)
got_c, _ = one_step(engine, engine.cached, state)
print(f"cached step noise_pred: {agreement(got_c, want_c)}")
if a.fp32:
    truth = svdexport.load(a.fp32).eager_reference()
    x32 = truth.example_inputs(a.seed)
    s32 = {**x32, "bases": engine.sampler.bases.float(),
           "timestep": truth.sampling.model_timestep(torch.tensor(370.0), x32["hidden_states"])}
    ref32, _ = one_step(truth, truth.full, s32)
    print(f"against fp32 eager: engine {agreement(got[0], ref32[0])}; eager {engine.manifest.dtype} "
          f"{agreement(want[0], ref32[0])}")
