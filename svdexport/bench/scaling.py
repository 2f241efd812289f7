"""Batch throughput against the number of Ray workers, measured in one run on one Ray runtime.

    svdexport bench scaling engines/flux-aoti --items 64 --workers 1,2 --repeats 2 \\
        --plot docs/batch_scaling.png --json out/scaling.json

Worker counts alternate (1, 2, 1, 2, ...) so that a drift of the machine hits all of them; each run writes
into a fresh temporary folder. Throughput counts generation only (all workers ready to last image); actor
start-up (engine loading) is reported beside it.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from svdexport.batch.runner import BatchOptions, start_ray, run
from svdexport.runtime.manifest import read as read_manifest


def measure(engine: str, items: int, workers: list[int], repeats: int, steps: int | None) -> dict:
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "items.txt"
        labels = read_manifest(Path(engine)).model.conditioning.labels or ["a photograph of a red fox in snow"]
        listing.write_text("".join(f"{labels[i % len(labels)]}\n" for i in range(items)))
        start_ray(BatchOptions(engine=engine, items=str(listing), out=tmp))
        runs: dict[int, list[dict]] = {w: [] for w in workers}
        try:
            for r in range(repeats):
                for w in workers:
                    s = run(BatchOptions(engine=engine, items=str(listing), out=f"{tmp}/r{r}w{w}", workers=w,
                                         steps=steps), progress=False)
                    runs[w].append({"images_per_minute": s.images_per_minute, "startup_seconds": s.startup_seconds})
        finally:
            ray.shutdown()
    per = {w: {"images_per_minute": statistics.median(x["images_per_minute"] for x in rs),
               "startup_seconds": statistics.median(x["startup_seconds"] for x in rs), "runs": rs}
           for w, rs in runs.items()}
    base = per[workers[0]]["images_per_minute"]
    for w in per:
        per[w]["ratio"] = per[w]["images_per_minute"] / base
    return {"engine": engine, "items": items, "repeats": repeats, "cpus": _cpus(), "workers": per}


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = sorted(result["workers"], key=int)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([str(w) for w in ws], [result["workers"][w]["images_per_minute"] for w in ws], color="tab:blue")
    for i, w in enumerate(ws):
        v = result["workers"][w]
        ax.annotate(f"{v['ratio']:.2f}x", (i, v["images_per_minute"]), ha="center", va="bottom")
    ax.set_xlabel("Ray workers (actors)")
    ax.set_ylabel("images per minute")
    ax.set_title(f"svdexport batch on {result['cpus']} CPU cores, {result['items']} items")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_result(result: dict) -> str:
    """One line per worker count: throughput, its ratio to the first count, and start-up."""
    return "\n".join(f"{w} workers: {v['images_per_minute']:.1f} images/min ({v['ratio']:.2f}x), "
                     f"start-up {v['startup_seconds']:.1f} s" for w, v in result["workers"].items())
