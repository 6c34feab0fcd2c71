"""The evaluation's figures (PNG), drawn from `pipeline.evaluation.results.Results` alone, for MLflow and the
report."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402

from perception.evaluation.intervals import Estimate  # noqa: E402
from perception.rotations import MODES  # noqa: E402
from pipeline.evaluation.decision import DECISION_TASKS, candidates, pareto_front  # noqa: E402
from pipeline.evaluation.results import CostTable, Results, RotationRow  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    # A fixed date and software tag keep the PNG bytes the same for the same numbers.
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def _errors(estimates: list[Estimate]) -> list[list[float]]:
    """matplotlib's asymmetric yerr, [[below...], [above...]], from estimates."""
    return [
        [max(0.0, e.value - e.lo) for e in estimates],
        [max(0.0, e.hi - e.value) for e in estimates],
    ]


def rotation_figure(rotation: dict[str, RotationRow], path: Path) -> Path:
    fig, (bars, angles) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(rotation)
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        estimates = [rotation[n].accuracy[mode] for n in names]
        xs = [j + (i - 1) * width for j in range(len(names))]
        bars.bar(
            xs,
            [e.value for e in estimates],
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
        bins = [b for b in rotation[name].angle_bins["so3"] if b.value is not None]
        centres = [(b.low_deg + b.high_deg) / 2 for b in bins]
        line = angles.plot(centres, [b.value for b in bins], marker="o", label=name)[0]
        angles.fill_between(
            centres, [b.lo for b in bins], [b.hi for b in bins], color=line.get_color(), alpha=0.15
        )
    angles.set_xlabel("rotation angle (degrees, 15-degree bins)")
    angles.set_ylabel("accuracy under SO(3)")
    angles.set_ylim(0, 1.05)
    angles.set_title("Accuracy against geodesic rotation angle", fontsize=10)
    angles.legend(fontsize=7)
    return save_figure(fig, path)


PARTS = (("a", "(a) same field of view"), ("b", "(b) larger canvas"), ("c", "(c) object scaled"))


def resolution_figure(results: Results, path: Path) -> Path:
    """Left: each variant's drop on (a), (b), (c) and (b)+(c) at the largest canvas. Right: accuracy on
    every test set against the scale."""
    resolution, canvas = results.resolution, results.canvas
    largest = str(max(canvas.canvases))
    fig, (drops_ax, acc_ax) = plt.subplots(1, 2, figsize=(14, 4.8))
    names = list(resolution)
    keys = [*PARTS, ("b_plus_c", "(b) + (c)")]
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(keys):
        estimates = [getattr(resolution[n].drops[largest], key) for n in names]
        xs = [j + (i - 1.5) * width for j in range(len(names))]
        drops_ax.bar(
            xs,
            [e.value for e in estimates],
            width,
            yerr=_errors(estimates),
            capsize=2,
            label=label,
            hatch="//" if key == "b_plus_c" else None,
        )
    drops_ax.axhline(0, color="black", linewidth=0.6)
    drops_ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    drops_ax.set_ylabel("accuracy drop from the training distribution")
    drops_ax.set_title(
        f"Drops at {canvas.train_resolution} -> {largest} px: does (a) = (b) + (c)? (95% intervals)",
        fontsize=10,
    )
    drops_ax.legend(fontsize=7)
    # Right: accuracy on every test set at the largest canvas, the training distribution first.
    sets = [("in", "in (training distribution)")] + [
        (f"{kind}_{largest}", label)
        for kind, label in (
            ("fov", "(a) fov"),
            ("centre", "(b) centre"),
            ("corner", "(b) corner"),
            ("scaled", "(c) scaled"),
        )
    ]
    width = 0.8 / len(sets)
    for i, (key, label) in enumerate(sets):
        estimates = [resolution[n].accuracy[key] for n in names]
        xs = [j + (i - (len(sets) - 1) / 2) * width for j in range(len(names))]
        acc_ax.bar(xs, [e.value for e in estimates], width, yerr=_errors(estimates), capsize=2, label=label)
    acc_ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    acc_ax.set_ylabel("test accuracy")
    acc_ax.set_ylim(0, 1.05)
    acc_ax.set_title(f"Accuracy on each test set at {largest} px (95% intervals)", fontsize=10)
    acc_ax.legend(fontsize=7)
    return save_figure(fig, path)


def cost_figure(cost: CostTable, path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    keys = (
        ("latency_ms", "latency", "forward latency (ms), 20th percentile of blocks, 95% CI"),
        ("peak_memory_mb", "memory", "peak memory (MB)"),
        ("flops_total", "flops", "FLOPs (counted: context)"),
    )
    models = list(dict.fromkeys(r.model for r in cost.rows))
    for ax, (key, fit_key, label) in zip(axes, keys, strict=True):
        for model in models:
            rows = sorted((r for r in cost.rows if r.model == model), key=lambda r: r.tokens)
            tokens = [r.tokens for r in rows]
            fit = getattr(cost.fits[model], fit_key)
            name = f"{model} (k={fit.value:.2f} [{fit.lo:.2f}, {fit.hi:.2f}])"
            values = [getattr(r, key) for r in rows]
            if key == "latency_ms":
                # A row without an interval (too few blocks to resample) gets no bar.
                lo = [r.latency_ms if r.latency_ms_lo is None else r.latency_ms_lo for r in rows]
                hi = [r.latency_ms if r.latency_ms_hi is None else r.latency_ms_hi for r in rows]
                spread = [
                    [r.latency_ms - a for r, a in zip(rows, lo, strict=True)],
                    [b - r.latency_ms for r, b in zip(rows, hi, strict=True)],
                ]
                ax.errorbar(tokens, values, yerr=spread, marker="o", capsize=3, label=name)
            else:
                ax.plot(tokens, values, marker="o", label=f"{model} (k={fit.value:.2f})")
        # Reference slopes 1 and 2 through the first point of the first model.
        first = sorted((r for r in cost.rows if r.model == models[0]), key=lambda r: r.tokens)
        t0, y0 = first[0].tokens, max(getattr(first[0], key), 1e-12)
        span = [t0, first[-1].tokens]
        for slope, style in ((1, "--"), (2, ":")):
            ax.plot(span, [y0 * (t / t0) ** slope for t in span], style, color="grey", label=f"slope {slope}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        # Label the measured token counts themselves; log-scale minor labels overlap.
        all_tokens = sorted({r.tokens for r in cost.rows})
        ax.set_xticks(all_tokens, [str(t) for t in all_tokens])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("tokens")
        ax.set_ylabel(label)
        ax.legend(fontsize=6)
    crossover = cost.crossover_tokens
    fig.suptitle(
        "Cost against tokens (log-log; k: exponent fitted from "
        f"{cost.setting.get('fit_min_tokens', '?')} tokens up, 95% interval); pure Mamba faster than ViT "
        + (f"from {crossover} tokens" if crossover else "nowhere in the sweep")
    )
    return save_figure(fig, path)


def serialisation_figure(results: Results, path: Path) -> Path:
    """Left: accuracy on the proximity task per scan order (and the attention reference). Right: accuracy
    against each order's locality statistic on the task's grid."""
    fig, (acc_ax, loc_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    models = results.serialisation.models
    names = list(models)
    groups = [
        ("all test images", None),
        ("horizontal segments", "horizontal"),
        ("vertical segments", "vertical"),
    ]
    width = 0.8 / len(groups)
    for i, (label, key) in enumerate(groups):
        if key is not None and not all(key in models[n].by_orientation for n in names):
            continue
        estimates = [models[n].accuracy if key is None else models[n].by_orientation[key] for n in names]
        xs = [j + (i - 1) * width for j in range(len(names))]
        acc_ax.bar(xs, [e.value for e in estimates], width, yerr=_errors(estimates), capsize=2, label=label)
    acc_ax.axhline(0.5, color="black", linestyle=":", linewidth=0.8, label="chance")
    labels = [n if models[n].scan_order else f"{n} (attention)" for n in names]
    acc_ax.set_xticks(range(len(names)), labels, rotation=25, ha="right", fontsize=8)
    acc_ax.set_ylim(0, 1.05)
    acc_ax.set_ylabel("proximity-task test accuracy")
    acc_ax.set_title("Pure Mamba per scan order, and attention (95% intervals)", fontsize=10)
    acc_ax.legend(fontsize=7)
    for name in names:
        row = models[name]
        if row.locality is None:
            continue
        x = row.locality.grid_nbr_within_window_frac
        e = row.accuracy
        loc_ax.errorbar([x], [e.value], yerr=_errors([e]), marker="o", capsize=3)
        loc_ax.annotate(row.scan_order, (x, e.value), textcoords="offset points", xytext=(5, 5), fontsize=8)
    grid = results.serialisation.task_grid.replace("locality_", "")
    loc_ax.set_xlabel(f"2D neighbours within 4 tokens in the sequence (fraction, {grid} grid)")
    loc_ax.set_ylabel("test accuracy")
    loc_ax.set_ylim(0, 1.05)
    loc_ax.set_xlim(0, 1.05)
    loc_ax.set_title("Accuracy against how much 2D proximity each order keeps", fontsize=10)
    return save_figure(fig, path)


def latency_axis(ax) -> None:
    """A log latency axis labelled with plain numbers, after the data are drawn: at 1-2-5 steps, or, where
    the data span less than one such step apart from the ends (LogLocator then falls back to linear ticks
    every 0.25, whose labels run into each other), at no more than five round values."""
    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    steps = [v for v in (m * 10.0**e for e in range(-3, 4) for m in (1, 2, 5)) if lo <= v <= hi]
    if len(steps) >= 2:
        # Plain numbers at 1-2-5 steps: log axes' default minor labels overlap within a decade.
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    else:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=5, steps=[1, 2, 5, 10]))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def tradeoff_figure(results: Results, path: Path) -> Path:
    """Accuracy against batch-1 latency, one panel per task and condition, both with their intervals; the
    Pareto front joined and ringed; models that did not learn their task in grey."""
    panels = [
        (task, condition, label)
        for task in DECISION_TASKS
        for condition, label in ((c.name, c.label) for c in results.deployment.conditions.get(task, []))
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 5.4), squeeze=False)
    for ax, (task, condition, label) in zip(axes[0], panels, strict=True):
        found = candidates(results, task, condition)
        front = pareto_front([c for c in found if c.adequate])
        for c in found:
            lat, acc = c.latency_ms, c.accuracy
            ax.errorbar(
                [lat.value],
                [acc.value],
                xerr=[[max(0.0, lat.value - lat.lo)], [max(0.0, lat.hi - lat.value)]],
                yerr=[[max(0.0, acc.value - acc.lo)], [max(0.0, acc.hi - acc.value)]],
                fmt="o" if c.adequate else "x",
                color=None if c.adequate else "0.6",
                capsize=3,
                label=c.name if c.adequate else f"{c.name} (did not learn)",
            )
        by_name = {c.name: c for c in found}
        if front:
            xs = [by_name[n].latency_ms.value for n in front]
            ys = [by_name[n].accuracy.value for n in front]
            ax.plot(xs, ys, "--", color="0.3", lw=1, zorder=0)
            ax.scatter(xs, ys, s=160, facecolors="none", edgecolors="0.2", label="Pareto front")
        latency_axis(ax)
        ax.set_xlabel(f"batch-1 latency, ms ({results.deployment.device})")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{task}: {label}", fontsize=9)
        # Below the panel, where it hides no model.
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    return save_figure(fig, path)


def draw_figures(results: Results, folder: Path) -> list[Path]:
    folder = Path(folder)
    figures = []
    if results.rotation:
        figures.append(rotation_figure(results.rotation, folder / "rotation.png"))
    if results.resolution:
        figures.append(resolution_figure(results, folder / "resolution_accuracy.png"))
    if results.cost.rows:
        figures.append(cost_figure(results.cost, folder / "cost_vs_tokens.png"))
    if results.serialisation.models:
        figures.append(serialisation_figure(results, folder / "serialisation.png"))
    if results.deployment.models:
        figures.append(tradeoff_figure(results, folder / "tradeoff.png"))
    return figures
