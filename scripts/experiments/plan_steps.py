"""What `build --plan-steps N` is worth: requests of N steps with the statistics of N steps (plan searched and
svd-fitted's weights fitted at N) against the fallback the same engine runs without them (svd-taylor order 1
on Taylor's plan searched at the calibrated count and rescaled to N), on the same bases and seeds. PSNR of the
unpacked latents against eager full compute of N steps, as `svdexport compare` measures it.

    svdexport build --model flux --backend aoti --plan-steps 28 --out engines/flux-aoti
    PYTHONPATH=. python scripts/experiments/plan_steps.py engines/flux-aoti 28 5,6,8 1000:16

Result (2026-11-27, that engine, held-out seeds 1000-1015; mean / worst dB), in the README ("Another step count"):

  full steps of 28   fitted at 28     fallback         fitted wins
  5                  38.82 / 29.15    37.30 / 27.65    12 of 16
  6                  43.51 / 29.41    39.04 / 32.91    14 of 16
  8                  48.41 / 38.87    44.35 / 33.11    15 of 16
"""
import statistics
import sys

import torch

import svdexport
from svdexport.bench.metrics import psnr


def main(engine_dir: str, steps: int, budgets: list[int], first: int, count: int) -> None:
    engine = svdexport.load(engine_dir)
    if engine.stats_for(steps).steps != steps:
        sys.exit(f"{engine_dir} keeps no plan statistics of {steps} steps: build it with --plan-steps {steps}")
    eager = engine.eager_reference()
    own = dict(engine.planner._stats_by_steps)
    fallback = {engine.plan_stats.steps: engine.plan_stats}  # as if the build had kept only its own count

    def image(g):
        return engine.family.unpack(g.latents, engine.shapes)[0]

    rows = {}
    with torch.inference_mode():
        for seed in range(first, first + count):
            x = engine.example_inputs(seed, [seed % len(engine.labels)] if engine.labels else None)
            ref = image(eager.generate(x, steps=steps, interval=1))
            for b in budgets:
                for name, sets in (("fitted at N", own), ("fallback", fallback)):
                    engine.planner._stats_by_steps = sets
                    g = engine.generate(x, steps=steps, full_steps=b)
                    rows.setdefault((b, name), []).append(min(psnr(image(g), ref), 99.0))
    engine.planner._stats_by_steps = own
    print(f"{engine_dir}, {steps} steps, seeds {first}-{first + count - 1}: mean / worst dB")
    print("| full steps | fitted at N | fallback | fitted wins |")
    print("|---|---|---|---|")
    for b in budgets:
        f, t = rows[(b, "fitted at N")], rows[(b, "fallback")]
        wins = sum(a > c for a, c in zip(f, t))
        print(f"| {b} | {statistics.mean(f):.2f} / {min(f):.2f} | {statistics.mean(t):.2f} / {min(t):.2f} | "
              f"{wins} of {len(f)} |")


if __name__ == "__main__":
    start, n = (int(v) for v in sys.argv[4].split(":"))
    main(sys.argv[1], int(sys.argv[2]), [int(b) for b in sys.argv[3].split(",")], start, n)
