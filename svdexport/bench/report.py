"""Outputs of `svdexport compare`: JSON, markdown tables, the image grid and the speed/quality frontier."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from svdexport.files import atomic_file
from svdexport.media import MARK, json_text, png_info

COLUMNS = ["method", "backend", "full_steps", "total_steps", "latency_s", "speedup", "psnr_db", "ssim",
           "rel_l2", "class_acc", "temporal_psnr_db"]


def to_json(result: dict) -> str:
    return json_text({k: v for k, v in result.items() if k != "images"})


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def table(rows: list[dict], interval: int | None = None) -> str:
    rows = [r for r in rows if interval is None or r["interval"] in (interval, 1)]
    # Columns that apply: class accuracy for class-conditioned models, temporal PSNR for videos.
    cols = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    c = result["config"]
    ref = c.get("reference", "eager full compute")
    out = [f"# svdexport compare: {c['model']} ({c['backend']} engine)", "",
           f"{c['samples']} samples, {c['steps']} steps, warmup {c['cache']['warmup']}, granularity "
           f"{c['cache']['granularity']}, tau {c['cache']['tau']}, k_max {c['cache']['k_max']}; machine: "
           f"{result['machine']['platform']}, torch {result['machine']['torch']}, "
           f"{result['machine']['threads']} threads. Speedup: {ref} latency / method latency, "
           f"measured interleaved in one run. PSNR, SSIM: decoded samples against {ref}.", ""]
    if c.get("peers_unavailable"):
        out += ["Peers not run: " + "; ".join(f"{k} ({v})" for k, v in c["peers_unavailable"].items()), ""]
    for iv in c["intervals"]:
        out += [f"## interval {iv}", "", table(result["rows"], iv), ""]
    if len(c["intervals"]) > 1:
        out += ["## frontier (PSNR dB / speedup per interval)", "", frontier_table(result), ""]
    return "\n".join(out)


def frontier_table(result: dict) -> str:
    ivs = result["config"]["intervals"]
    by = {}
    for r in result["rows"]:
        if r["interval"] != 1:
            by.setdefault(r["method"], {})[r["interval"]] = r
    lines = ["| method | " + " | ".join(f"interval {i}" for i in ivs) + " |", "|---|" + "---|" * len(ivs)]
    for name, per in by.items():
        cells = [f"{per[i]['psnr_db']:.1f} dB @ {per[i]['speedup']:.2f}x" if i in per else "-" for i in ivs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _tile(img: torch.Tensor, scale: int) -> np.ndarray:
    if img.dim() == 4:  # a video [C, F, H, W]: its middle frame
        img = img[:, img.shape[1] // 2]
    x = img[:3] if img.shape[0] >= 3 else img[:1].expand(3, -1, -1)
    x = ((x.clamp(-1, 1) + 1) / 2 * 255).round().byte().permute(1, 2, 0).numpy()
    return np.kron(x, np.ones((scale, scale, 1), dtype=np.uint8))


def grid(result: dict, path: Path, interval: int, max_samples: int = 16) -> None:
    """Reference and every method at `interval`, one row each, the same samples in the columns."""
    keys = ["reference"] + [f"{r['method']}@{r['interval']}" for r in result["rows"]
                            if r["interval"] == interval and r["method"] != result["rows"][0]["method"]]
    names = [f"{result['rows'][0]['method']} (reference)"] + [k.rsplit("@", 1)[0] for k in keys[1:]]
    first = result["images"]["reference"][0]
    scale = max(1, 48 // first.shape[-1])
    tile_h, tile_w = first.shape[-2] * scale, first.shape[-1] * scale
    n = min(max_samples, len(result["images"]["reference"]))
    label_w, pad = 260, 2
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

    return plt.subplots(figsize=size)


def _save(fig, ax, path: Path) -> None:
    """Grid, legend, and an atomic PNG write."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": MARK})  # marks the file as svdexport's
    plt.close(fig)


def frontier_plot(result: dict, path: Path) -> None:
    """Speed (x) against quality (PSNR, y) for every method across the swept intervals."""
    by = {}
    for r in result["rows"]:
        if r["interval"] != 1:
            by.setdefault(r["method"], []).append(r)
    fig, ax = _figure((9, 6))
    for name, rows in by.items():
        rows = sorted(rows, key=lambda r: r["interval"])
        style = "-o" if name.startswith("SVD-Cache") else "--s"
        ax.plot([r["speedup"] for r in rows], [r["psnr_db"] for r in rows], style, label=name, linewidth=2 if "engine" in name else 1)
        for r in rows:
            ax.annotate(str(r["interval"]), (r["speedup"], r["psnr_db"]), fontsize=6, alpha=0.6)
    c = result["config"]
    ax.set_xlabel("speedup vs eager full compute (wall time, same run)")
    ax.set_ylabel("PSNR vs full compute (dB)")
    ax.set_title(f"{c['model']}: {c['samples']} samples, {c['steps']} steps, intervals {c['intervals']}")
    _save(fig, ax, path)


def temporal_plot(result: dict, path: Path, interval: int) -> None:
    """Videos: PSNR between consecutive frames along the video, per method at `interval`, against the
    reference (eager full compute, black). Lower than the reference means flicker."""
    curves = result["temporal"]
    fig, ax = _figure((9, 5))
    ref = curves["reference"]
    ax.plot(range(1, len(ref) + 1), ref, "k-", linewidth=3, label="eager full compute (reference)")
    for key, curve in curves.items():
        name, _, iv = key.rpartition("@")
        if key != "reference" and iv == str(interval):
            ax.plot(range(1, len(curve) + 1), curve, "-o" if name.startswith("SVD-Cache") else "--",
                    label=name, linewidth=2 if "engine" in name else 1, markersize=3)
    ax.set_xticks(range(1, len(ref) + 1))
    ax.set_xlabel("latent frame pair (f, f + 1)")
    ax.set_ylabel("PSNR between consecutive frames (dB)")
    ax.set_title(f"{result['config']['model']}: temporal consistency at interval {interval}")
    _save(fig, ax, path)


def write_docs(result: dict, path: Path, command: str) -> None:
    """docs/benchmarks.md with its plots beside it; generated, not hand-edited."""
    path = Path(path)
    frontier_png, grid_png = path.with_name(path.stem + "_frontier.png"), path.with_name(path.stem + "_grid.png")
    iv = 7 if 7 in result["config"]["intervals"] else result["config"]["intervals"][0]
    frontier_plot(result, frontier_png)
    grid(result, grid_png, iv)
    text = (f"<!-- generated by: {command} -->\n" + markdown(result)
            + f"\n![frontier]({frontier_png.name})\n\n![samples at interval {iv}]({grid_png.name})\n")
    if result["temporal"]:
        temporal_png = path.with_name(path.stem + "_temporal.png")
        temporal_plot(result, temporal_png, iv)
        text += f"\n![temporal consistency at interval {iv}]({temporal_png.name})\n"
    with atomic_file(path) as tmp:
        tmp.write_text(text)
