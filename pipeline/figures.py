"""The evaluation's figures (PNG), drawn from `results.json` alone, for MLflow and the report."""

from __future__ import annotations

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


def _errors(estimates: list[dict[str, float]]) -> list[list[float]]:
    """matplotlib's asymmetric yerr, [[below...], [above...]], from {value, lo, hi} estimates."""
    return [
        [max(0.0, e["value"] - e["lo"]) for e in estimates],
        [max(0.0, e["hi"] - e["value"]) for e in estimates],
    ]


def rotation_figure(rotation: dict[str, Any], path: Path) -> Path:
    fig, (bars, angles) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(rotation)
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        estimates = [rotation[n]["accuracy"][mode] for n in names]
        xs = [j + (i - 1) * width for j in range(len(names))]
        bars.bar(
            xs,
            [e["value"] for e in estimates],
            width,
            yerr=_errors(estimates),
            capsize=3,
            label={"none": "no rotation", "z": "about up (z)"}.get(mode, "SO(3)"),
        )
    bars.set_xticks(range(len(names)), names, rotation=25, ha="right")
    bars.set_ylim(0, 1.05)
    bars.set_ylabel("test accuracy")
    bars.set_title("Point models under rotation (95% intervals over seeds and clouds)", fontsize=10)
    bars.legend(fontsize=8)
    for name in names:
        bins = [b for b in rotation[name]["angle_bins"]["so3"] if "value" in b]
        centres = [(b["low_deg"] + b["high_deg"]) / 2 for b in bins]
        line = angles.plot(centres, [b["value"] for b in bins], marker="o", label=name)[0]
        angles.fill_between(
            centres, [b["lo"] for b in bins], [b["hi"] for b in bins], color=line.get_color(), alpha=0.15
        )
    angles.set_xlabel("rotation angle (degrees, 15-degree bins)")
    angles.set_ylabel("accuracy under SO(3)")
    angles.set_ylim(0, 1.05)
    angles.set_title("Accuracy against geodesic rotation angle", fontsize=10)
    angles.legend(fontsize=7)
    return _save(fig, path)


def resolution_figure(resolution: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, row in resolution.items():
        res = sorted(int(r) for r in row["accuracy"])
        estimates = [row["accuracy"][str(r)] for r in res]
        ax.errorbar(
            res, [e["value"] for e in estimates], yerr=_errors(estimates), marker="o", capsize=3, label=name
        )
    train_res = next(iter(resolution.values()))["train_resolution"] if resolution else None
    if train_res:
        ax.axvline(train_res, color="grey", linestyle=":", label="training resolution")
    ax.set_xlabel("test resolution (px)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("Image models at resolutions they were not trained on (95% intervals)", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def cost_figure(cost: dict[str, Any], path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    keys = (
        ("latency_ms", "latency", "forward latency (ms), median and IQR"),
        ("peak_memory_mb", "memory", "peak memory (MB)"),
        ("flops_total", "flops", "FLOPs (counted: context)"),
    )
    models = list(dict.fromkeys(r["model"] for r in cost["rows"]))
    for ax, (key, fit_key, label) in zip(axes, keys, strict=True):
        for model in models:
            rows = sorted((r for r in cost["rows"] if r["model"] == model), key=lambda r: r["tokens"])
            tokens = [r["tokens"] for r in rows]
            fit = cost["fits"][model][fit_key]
            name = f"{model} (k={fit['value']:.2f} [{fit['lo']:.2f}, {fit['hi']:.2f}])"
            if key == "latency_ms":
                spread = [
                    [r["latency_ms"] - r["latency_ms_q25"] for r in rows],
                    [r["latency_ms_q75"] - r["latency_ms"] for r in rows],
                ]
                ax.errorbar(tokens, [r[key] for r in rows], yerr=spread, marker="o", capsize=3, label=name)
            else:
                ax.plot(tokens, [r[key] for r in rows], marker="o", label=f"{model} (k={fit['value']:.2f})")
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
        ax.legend(fontsize=6)
    crossover = cost.get("crossover_tokens")
    fig.suptitle(
        "Cost against tokens (log-log; k: exponent fitted from "
        f"{cost['setting'].get('fit_min_tokens', '?')} tokens up, 95% interval); pure Mamba faster than ViT "
        + (f"from {crossover} tokens" if crossover else "nowhere in the sweep")
    )
    return _save(fig, path)


def serialisation_figure(results: dict[str, Any], path: Path) -> Path:
    fig, (acc_ax, loc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    locality = results["serialisation"]["orders"]
    orders = list(locality)
    grids = list(locality[orders[0]])
    mamba = {
        row["scan_order"]: row
        for row in results["resolution"].values()
        if row["family"] == "mamba_hybrid" and row.get("scan_order")
    }
    shown = [o for o in orders if o in mamba]
    if shown:
        estimates = [mamba[o]["accuracy"][str(mamba[o]["train_resolution"])] for o in shown]
        acc_ax.bar(shown, [e["value"] for e in estimates], yerr=_errors(estimates), capsize=4)
    acc_ax.set_ylim(0, 1.05)
    acc_ax.set_ylabel("Mamba-hybrid test accuracy")
    acc_ax.set_title("Accuracy per scan order (95% intervals)", fontsize=10)
    width = 0.8 / len(grids)
    for i, grid in enumerate(grids):
        fractions = [locality[o][grid]["grid_nbr_within_window_frac"] for o in orders]
        loc_ax.bar(
            [j + i * width for j in range(len(orders))], fractions, width, label=grid.replace("locality_", "")
        )
    loc_ax.set_xticks([j + width * (len(grids) - 1) / 2 for j in range(len(orders))], orders)
    loc_ax.set_ylim(0, 1.05)
    loc_ax.set_ylabel("2D neighbours within 4 tokens in 1D")
    loc_ax.set_title("How each order keeps grid neighbours together (context)", fontsize=10)
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
        figures.append(serialisation_figure(results, folder / "serialisation.png"))
    return figures
