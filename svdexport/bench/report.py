"""Outputs of `svdexport compare`: JSON, markdown tables per budget, the image grid and the two frontiers
(PSNR against full steps, PSNR against measured speedup)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from svdexport.bench.stats import HELDOUT_SEEDS, PSNR_CAP
from svdexport.cache.predictors import FITTED
from svdexport.files import atomic_file
from svdexport.media import MARK, json_text, png_info

COLUMNS = ["method", "backend", "plan_kind", "full_steps", "latency_s", "speedup", "psnr_db", "psnr_worst_db",
           "paired", "wins", "ssim", "rel_l2", "class_acc", "temporal_psnr_db", "settings"]
HEADERS = {"plan_kind": "plan", "full_steps": "full steps", "latency_s": "latency s", "psnr_db": "PSNR mean",
           "psnr_worst_db": "PSNR worst", "paired": "vs SVD-Cache (mean ± sd dB)", "wins": "SVD-Cache wins",
           "class_acc": "class acc", "temporal_psnr_db": "temporal PSNR", "rel_l2": "rel L2", "ssim": "SSIM"}


def to_json(result: dict) -> str:
    return json_text({k: v for k, v in result.items() if k != "images"})


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def _cell(r: dict, c: str) -> str:
    if c == "full_steps":
        lo, hi = r["full_steps_min"], r["full_steps_max"]
        return str(lo) if lo == hi else f"{r['full_steps']:.2f} ({lo}-{hi})"
    if c == "paired":
        p = r["paired"]
        return "-" if p is None else f"{p['diff_mean']:+.2f} ± {p['diff_std']:.2f}"
    if c == "wins":
        p = r["paired"]
        return "-" if p is None else f"{p['reference_wins']}/{p['n']}"
    if c == "plan_kind":  # a calibrated plan names the forecast its search was for
        return r["plan_kind"] + (f": {r['plan_search']}" if r.get("plan_search") else "")
    if c == "settings":
        # The numbers only (threshold, interval, gamma ...); the settings table below has everything.
        return ", ".join(f"{k} {v}" for k, v in r["settings"].items()
                         if isinstance(v, (int, float)) and k != "sweep_full_steps") or "-"
    return _fmt(r.get(c))


def table(rows: list[dict], budget: int | None = None) -> str:
    """The rows at `budget` full steps (all rows if None), the reference first."""
    rows = [r for r in rows if budget is None or r["budget"] == budget or r["reference"]]
    # Columns that apply: class accuracy for class-conditioned models, temporal PSNR for videos.
    cols = [c for c in COLUMNS if c in ("paired", "wins", "settings") or any(r.get(c) is not None for r in rows)]
    lines = ["| " + " | ".join(HEADERS.get(c, c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r, c).replace("|", "/") for c in cols) + " |")
    return "\n".join(lines)


def best_plans(rows: list[dict], budget: int) -> str:
    """Per method run on several plans at `budget`: each plan's mean / worst dB, its best plan first."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["budget"] == budget and r.get("best_plan") is not None:
            groups.setdefault(r["base_method"], []).append(r)
    lines = ["| method | best plan: mean / worst dB | other plans |", "|---|---|---|"]
    for base, group in groups.items():
        group = sorted(group, key=lambda r: not r["best_plan"])
        cells = [f"{r['method']} ({_cell(r, 'plan_kind')}): {r['psnr_db']:.2f} / {r['psnr_worst_db']:.2f}"
                 for r in group]
        lines.append(f"| {base} | {cells[0]} | {'; '.join(cells[1:])} |")
    return "\n".join(lines) if groups else ""


def _machine_text(m: dict) -> str:
    cpu = f"{m['cpu']} ({m['bf16_units']}), {m['cores']} cores, " if "cpu" in m else ""
    load = (f"; load average {m['load_average_start']:.1f} at the start, {m['load_average_end']:.1f} at the end "
            f"(timings shared the machine with other jobs where it exceeds the threads)"
            if "load_average_start" in m else "")
    return f"{m['platform']}, {cpu}torch {m['torch']}, {m['threads']} threads{load}"


def _forecast(cache: dict) -> str:
    if cache["predictor"] in FITTED:
        return "svd-fitted (weights fitted per step on the calibration trajectories)"
    return f"{cache['predictor']} order {cache['order']}, gamma {cache['gamma']}"


def markdown(result: dict) -> str:
    c = result["config"]
    seeds = c["seeds"]
    seed_text = (f"seeds {seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[0] + len(seeds)))
                 else "seeds " + ",".join(map(str, seeds)))
    out = [f"# svdexport compare: {c['model']} ({c['backend']} engine)", "",
           f"{c['samples']} samples ({seed_text}), {c['steps']} steps, budgets of {', '.join(map(str, c['budgets']))} "
           f"full steps; engine: warmup {c['cache']['warmup']}, plan {c['cache'].get('plan_kind', c['cache'].get('plan'))} (at {c['steps']} steps: "
           f"{' '.join(map(str, c['engine_plan']))}), predictor {_forecast(c['cache'])}, granularity {c['cache']['granularity']}, tau {c['cache']['tau']}, k_max "
           f"{c['cache']['k_max']}; machine: {_machine_text(result['machine'])}.", "",
           "Every method runs with the budget's number of full steps. Plan: where its full steps fall (calibrated: "
           "a plan of that budget searched on the engine's calibration trajectories, for the forecast named after "
           "it: svd-fitted is the engine's own, SVD-Cache's plan, which the rows \"same plan\" and \"calibrated "
           "plan\" run; taylor gamma 1 is a Taylor step on the whole feature, the plan of the rows \"Taylor plan\" "
           "(the search models order 1, so order-2 rows get the same plan); reuse, of \"reuse plan\"; "
           "uniform: warmup, then every interval; own: the library's schedule "
           "with warmup and interval set to the budget; threshold: the library decides per step, its threshold "
           f"swept on seeds {', '.join(map(str, c['sweep_seeds']))} (not measured) to the budget, so its full steps "
           "vary per sample: mean (range)). Speedup: eager full compute latency / method latency, measured "
           "interleaved in one run. PSNR: decoded samples against eager full compute, mean and worst sample "
           f"(capped at {PSNR_CAP:.0f} dB). Paired, per sample against {c['paired_against']} at the same budget: "
           "mean ± standard deviation of (method - SVD-Cache), and the samples SVD-Cache wins.", ""]
    if seeds == list(HELDOUT_SEEDS):
        out += [f"Seeds {seeds[0]}-{seeds[-1]} are the project's held-out set: reported only, never used to choose a "
                "default, a setting or a target (README, \"Seeds\").", ""]
    if c.get("peers_unavailable"):
        out += ["Peers not run: " + "; ".join(f"{k} ({v})" for k, v in c["peers_unavailable"].items()), ""]
    for b in c["budgets"]:
        out += [f"## {b} of {c['steps']} full steps", "", table(result["rows"], b), ""]
        if best := best_plans(result["rows"], b):
            out += [f"Methods run on several plans at {b} full steps, each one's best plan (highest mean) first:",
                    "", best, ""]
    if len(c["budgets"]) > 1:
        out += ["## frontier (PSNR mean / worst dB @ speedup, per budget of full steps)", "", frontier_table(result), ""]
    out += ["## settings per method", "", settings_table(result), ""]
    return "\n".join(out)


def frontier_table(result: dict) -> str:
    bs = result["config"]["budgets"]
    by = {}
    for r in result["rows"]:
        if not r["reference"]:
            by.setdefault(r["method"], {})[r["budget"]] = r
    lines = ["| method | " + " | ".join(f"{b} full steps" for b in bs) + " |", "|---|" + "---|" * len(bs)]
    for name, per in by.items():
        cells = [f"{per[b]['psnr_db']:.1f} / {per[b]['psnr_worst_db']:.1f} dB @ {per[b]['speedup']:.2f}x"
                 if b in per else "-" for b in bs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def settings_table(result: dict) -> str:
    """Per method and budget: its full steps (the static plan where it has one) and its settings."""
    lines = ["| method | budget | full steps | settings |", "|---|---|---|---|"]
    for r in result["rows"]:
        plan = " ".join(map(str, r["plan"])) if r["plan"] is not None and not r["reference"] else _cell(r, "full_steps")
        sets = "; ".join(f"{k} {v}" for k, v in r["settings"].items()) or "-"
        lines.append(f"| {r['method']} | {r['budget']} | {plan} | {sets.replace('|', '/')} |")
    return "\n".join(lines)


def _tile(img: torch.Tensor, scale: int) -> np.ndarray:
    if img.dim() == 4:  # a video [C, F, H, W]: its middle frame
        img = img[:, img.shape[1] // 2]
    x = img[:3] if img.shape[0] >= 3 else img[:1].expand(3, -1, -1)
    x = ((x.clamp(-1, 1) + 1) / 2 * 255).round().byte().permute(1, 2, 0).numpy()
    return np.kron(x, np.ones((scale, scale, 1), dtype=np.uint8))


def grid(result: dict, path: Path, budget: int, max_samples: int = 16) -> None:
    """Reference and every method at `budget` full steps, one row each, the same samples in the columns."""
    keys = ["reference"] + [f"{r['method']}@{r['budget']}" for r in result["rows"]
                            if r["budget"] == budget and not r["reference"]]
    names = ["eager full compute (reference)"] + [k.rsplit("@", 1)[0] for k in keys[1:]]
    first = result["images"]["reference"][0]
    scale = max(1, 48 // first.shape[-1])
    tile_h, tile_w = first.shape[-2] * scale, first.shape[-1] * scale
    n = min(max_samples, len(result["images"]["reference"]))
    label_w, pad = 300, 2
    canvas = Image.new("RGB", (label_w + n * (tile_w + pad), len(keys) * (tile_h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (key, name) in enumerate(zip(keys, names)):
        y = row * (tile_h + pad)
        draw.text((4, y + tile_h // 2 - 6), name, fill="black")
        for col, img in enumerate(result["images"][key][:n]):
            canvas.paste(Image.fromarray(_tile(img, scale)), (label_w + col * (tile_w + pad), y))
    with atomic_file(path) as tmp:
        canvas.save(tmp, format="PNG", pnginfo=png_info())


def _figure(size: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # two dozen methods: 20 colours, then markers and line styles
    return fig, ax


def _save(fig, ax, path: Path) -> None:
    """Grid, legend, and an atomic PNG write."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": MARK})  # marks the file as svdexport's
    plt.close(fig)


def _lines(result: dict) -> dict[str, list[dict]]:
    """Per method, its rows across the budgets (fewest full steps first)."""
    by: dict[str, list[dict]] = {}
    for r in result["rows"]:
        if not r["reference"]:
            by.setdefault(r["method"], []).append(r)
    return {name: sorted(rows, key=lambda r: r["budget"]) for name, rows in by.items()}


def _style(name: str, plan_kind: str) -> dict:
    svd = name.startswith("SVD-Cache")
    marker = {"calibrated": "o", "uniform": "s", "own": "^", "threshold": "v"}.get(plan_kind, "D")
    engine = "(engine)" in name
    return {"marker": marker, "linestyle": "-" if svd else "--", "linewidth": 2.5 if engine else 1,
            "markersize": 5, "zorder": 3 if engine else 2}  # the engine's lines on top


def frontier_plot(result: dict, path: Path, x: str = "speedup") -> None:
    """Quality (mean PSNR, y) of every method across the budgets against `x`: "speedup" (measured wall time
    against eager full compute, same run) or "full_steps" (compute: mean full steps per sample)."""
    fig, ax = _figure((10, 6.5))
    for name, rows in _lines(result).items():
        xs = [r[x] for r in rows]
        ax.plot(xs, [r["psnr_db"] for r in rows], label=name, **_style(name, rows[0]["plan_kind"]))
        if x == "full_steps":
            for r in rows:
                if r["full_steps_min"] != r["full_steps_max"]:  # threshold peers: the per-sample range
                    ax.plot([r["full_steps_min"], r["full_steps_max"]], [r["psnr_db"]] * 2, "-", alpha=0.3,
                            color=ax.lines[-1].get_color())
    c = result["config"]
    if x == "full_steps":
        ax.set_xlabel(f"full steps of {c['steps']} (compute; threshold peers: mean, bar = per-sample range)")
    else:
        ax.set_xlabel("speedup vs eager full compute (wall time, same run)")
    ax.set_ylabel("PSNR vs full compute (dB), mean over samples")
    ax.set_title(f"{c['model']}: {c['samples']} samples, {c['steps']} steps, budgets {c['budgets']} full steps",
                 fontsize=9)
    _save(fig, ax, path)


def temporal_plot(result: dict, path: Path, budget: int) -> None:
    """Videos: PSNR between consecutive frames along the video, per method at `budget` full steps, against
    the reference (eager full compute, black). Lower than the reference means flicker."""
    curves = result["temporal"]
    fig, ax = _figure((10, 5))
    ref = curves["reference"]
    ax.plot(range(1, len(ref) + 1), ref, "k-", linewidth=3, label="eager full compute (reference)")
    for key, curve in curves.items():
        name, _, b = key.rpartition("@")
        if key != "reference" and b == str(budget):
            ax.plot(range(1, len(curve) + 1), curve, "-o" if name.startswith("SVD-Cache") else "--",
                    label=name, linewidth=2 if "engine" in name else 1, markersize=3)
    ax.set_xticks(range(1, len(ref) + 1))
    ax.set_xlabel("latent frame pair (f, f + 1)")
    ax.set_ylabel("PSNR between consecutive frames (dB)")
    ax.set_title(f"{result['config']['model']}: temporal consistency at {budget} full steps")
    _save(fig, ax, path)


def main_budget(result: dict) -> int:
    """The budget the grid and the temporal plot show: the engine's own plan's count when compared, else
    the nearest."""
    own = len(result["config"]["engine_plan"])
    return min(result["config"]["budgets"], key=lambda b: (abs(b - own), b))


def write_docs(result: dict, path: Path, command: str) -> None:
    """docs/benchmarks.md with its plots beside it; generated, not hand-edited."""
    path = Path(path)
    frontier_png, grid_png = path.with_name(path.stem + "_frontier.png"), path.with_name(path.stem + "_grid.png")
    compute_png = path.with_name(path.stem + "_compute.png")
    b = main_budget(result)
    frontier_plot(result, compute_png, "full_steps")
    frontier_plot(result, frontier_png, "speedup")
    grid(result, grid_png, b)
    text = (f"<!-- generated by: {command} -->\n" + markdown(result)
            + f"\n![PSNR against full steps]({compute_png.name})\n\n![PSNR against speedup]({frontier_png.name})\n"
            f"\n![samples at {b} full steps]({grid_png.name})\n")
    if result["temporal"]:
        temporal_png = path.with_name(path.stem + "_temporal.png")
        temporal_plot(result, temporal_png, b)
        text += f"\n![temporal consistency at {b} full steps]({temporal_png.name})\n"
    with atomic_file(path) as tmp:
        tmp.write_text(text)
