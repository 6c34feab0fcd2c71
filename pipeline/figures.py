"""The evaluation's figures (PNG), drawn from `results.json` alone, for MLflow and the report."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402

MODES = ("none", "z", "so3")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    # A fixed date and software tag keep the PNG bytes the same for the same numbers.
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def rotation_figure(rotation: dict[str, Any], path: Path) -> Path:
    fig, (bars, angles) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(rotation)
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        acc = [rotation[n]["modes"][mode]["accuracy"] for n in names]
        err = [rotation[n]["modes"][mode]["accuracy_std"] for n in names]
        xs = [j + (i - 1) * width for j in range(len(names))]
        bars.bar(
            xs,
            acc,
            width,
            yerr=err,
            capsize=3,
            label={"none": "no rotation", "z": "about up (z)"}.get(mode, "SO(3)"),
        )
    bars.set_xticks(range(len(names)), names, rotation=20, ha="right")
    bars.set_ylim(0, 1.05)
    bars.set_ylabel("test accuracy")
    bars.set_title("Point models under rotation (error bars: spread over draws)")
    bars.legend(fontsize=8)
    for name in names:
        bins = [b for b in rotation[name]["modes"]["so3"]["angle_bins"] if b["count"]]
        centres = [(b["low_deg"] + b["high_deg"]) / 2 for b in bins]
        angles.plot(centres, [b["accuracy"] for b in bins], marker="o", label=name)
    angles.set_xlabel("rotation angle (degrees, 15-degree bins)")
    angles.set_ylabel("accuracy under SO(3)")
    angles.set_ylim(0, 1.05)
    angles.set_title("Accuracy against geodesic rotation angle")
    angles.legend(fontsize=8)
    return _save(fig, path)


def resolution_figure(resolution: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in resolution.items():
        res = sorted(int(r) for r in row["accuracy"])
        ax.plot(res, [row["accuracy"][str(r)] for r in res], marker="o", label=name)
    train_res = next(iter(resolution.values()))["train_resolution"] if resolution else None
    if train_res:
        ax.axvline(train_res, color="grey", linestyle=":", label="training resolution")
    ax.set_xlabel("test resolution (px)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("Image models at resolutions they were not trained on")
    ax.legend(fontsize=8)
    return _save(fig, path)


def cost_figure(cost: dict[str, Any], path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    keys = (
        ("latency_ms", "forward latency (ms)"),
        ("peak_memory_mb", "peak memory (MB)"),
        ("flops_total", "FLOPs"),
    )
    models = sorted({r["model"] for r in cost["rows"]})
    for ax, (key, label) in zip(axes, keys, strict=True):
        for model in models:
            rows = sorted((r for r in cost["rows"] if r["model"] == model), key=lambda r: r["tokens"])
            tokens = [r["tokens"] for r in rows]
            exponent = cost["fits"][model][key]["exponent"]
            ax.plot(tokens, [r[key] for r in rows], marker="o", label=f"{model} (slope {exponent:.2f})")
        # Reference slopes 1 and 2 through the first point of the first model.
        first = sorted((r for r in cost["rows"] if r["model"] == models[0]), key=lambda r: r["tokens"])
        t0, y0 = first[0]["tokens"], max(first[0][key], 1e-12)
        span = [t0, first[-1]["tokens"]]
        for slope, style in ((1, "--"), (2, ":")):
            ax.plot(span, [y0 * (t / t0) ** slope for t in span], style, color="grey", label=f"slope {slope}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        # Label the measured token counts themselves; log-scale minor labels overlap.
        all_tokens = sorted({r["tokens"] for r in cost["rows"]})
        ax.set_xticks(all_tokens, [str(t) for t in all_tokens])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("tokens")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle("Cost against tokens (log-log)")
    return _save(fig, path)


def serialisation_figure(serialisation: dict[str, Any], path: Path) -> Path:
    fig, (acc_ax, loc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    orders = list(serialisation["orders"])
    accuracy = serialisation["mamba_accuracy"]
    acc_ax.bar(orders, [accuracy.get(o, math.nan) for o in orders])
    acc_ax.set_ylim(0, 1.05)
    acc_ax.set_ylabel("Mamba-hybrid test accuracy")
    acc_ax.set_title("Accuracy per scan order")
    grids = list(serialisation["orders"][orders[0]])
    width = 0.8 / len(grids)
    for i, grid in enumerate(grids):
        fractions = [serialisation["orders"][o][grid]["grid_nbr_within_window_frac"] for o in orders]
        loc_ax.bar(
            [j + i * width for j in range(len(orders))], fractions, width, label=grid.replace("locality_", "")
        )
    loc_ax.set_xticks([j + width * (len(grids) - 1) / 2 for j in range(len(orders))], orders)
    loc_ax.set_ylim(0, 1.05)
    loc_ax.set_ylabel("2D neighbours within 4 tokens in 1D")
    loc_ax.set_title("How each order keeps grid neighbours together")
    loc_ax.legend(fontsize=8)
    return _save(fig, path)


def draw_figures(results: dict[str, Any], folder: Path) -> list[Path]:
    folder = Path(folder)
    figures = []
    if results.get("rotation"):
        figures.append(rotation_figure(results["rotation"], folder / "rotation.png"))
    if results.get("resolution"):
        figures.append(resolution_figure(results["resolution"], folder / "resolution_accuracy.png"))
    if results.get("cost", {}).get("rows"):
        figures.append(cost_figure(results["cost"], folder / "cost_vs_tokens.png"))
    if results.get("serialisation"):
        figures.append(serialisation_figure(results["serialisation"], folder / "serialisation.png"))
    return figures
