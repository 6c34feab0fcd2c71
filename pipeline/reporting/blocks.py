"""The report's text as blocks, and the blocks as Markdown and as self-contained HTML.

A block is ("h1"|"h2"|"p", text), ("list", items), ("table", header, rows) or ("img", path). `layout` lays
out the report from the evaluation's `Results` and the verdicts; `render_markdown` and `render_html` write
it. Pure but for `hardware` (the machine the report runs on) and the figures the HTML inlines.
"""

from __future__ import annotations

import base64
import html
import math
import os
import platform
from pathlib import Path

from perception.evaluation.intervals import BootstrapSettings, Estimate
from perception.evaluation.plateau import PLATEAU_CALLS, PLATEAU_POINTS
from perception.training import unpack_correct
from pipeline.evaluation import verdicts as rules
from pipeline.evaluation.results import (
    Busiest,
    Decision,
    DecisionChoice,
    DecisionRecord,
    Results,
)
from pipeline.reporting.plateaus import Plateau

# claim -> the figure shown under its verdict
TRADEOFF_FIGURE = "tradeoff.png"
TRAINING_FIGURE = "training_curves.png"  # drawn by the report stage, beside the evaluation's
FIGURES = {
    1: "serialisation.png",
    2: "resolution_accuracy.png",
    3: "cost_vs_tokens.png",
    4: "rotation.png",
}


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _busiest_text(busiest: Busiest) -> str:
    gpu = "" if busiest.gpu_other_processes is None else f", {busiest.gpu_other_processes} other on the GPU"
    row = f"{busiest.model} at {busiest.tokens} tokens"
    return f"{busiest.others_cpu:.1%} of the CPUs while {row} was timed{gpu}"


def _pct_interval(estimate: Estimate | None) -> str:
    if estimate is None:
        return "n/a"
    return f"{100 * estimate.value:.1f}% [{100 * estimate.lo:.1f}, {100 * estimate.hi:.1f}]"


def hardware() -> list[str]:
    """The machine the report runs on: platform, Python, torch, cores and GPU."""
    import torch

    from perception.machine import processor_name

    lines = [
        f"{platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}",
        f"{os.cpu_count()} CPU cores ({processor_name()}), {torch.get_num_threads()} torch threads",
    ]
    lines.append(f"GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "GPU: none")
    return lines


def layout(
    results: Results,
    verdict_list: list[rules.Verdict],
    train_summary: dict,
    timings: list[tuple[str, float]],
    figures: dict[str, Path],
    decision: Decision | None,
    plateau_rows: list[Plateau],
) -> list[tuple]:
    """The report as blocks: which backbone (the decision table), the verdicts, each claim's rule and
    numbers, the tables, the training table (`plateau_rows`, `pipeline.reporting.plateaus`), where and how
    long."""
    mlflow = results.mlflow or train_summary.get("mlflow") or {}
    blocks: list[tuple] = [
        ("h1", "Vision backbones for robot perception: the four claims, measured"),
        *(_decision_blocks(decision, results, figures) if decision is not None else []),
        (
            "p",
            f"MLflow run {mlflow.get('parent_run_id', 'n/a')} "
            f"in experiment {mlflow.get('experiment', 'n/a')} "
            f"({mlflow.get('tracking_uri', 'n/a')}); data seed {results.seed}, training seeds "
            f"{', '.join(map(str, results.seeds))}; {results.test_samples.points} test clouds "
            f"({results.points_per_cloud} points each, as trained), "
            f"{results.test_samples.images} test images, {results.num_classes} classes.",
        ),
        (
            "p",
            "How to read it. A verdict judges one effect against a stated threshold: it holds when the whole "
            "95% interval lies beyond the threshold, does not hold when the whole interval lies within the "
            "equivalence margin of no effect, and is inconclusive otherwise. Only models that learned their "
            "task (in-distribution accuracy at least halfway from chance to 100%) may decide. Intervals: "
            + results.bootstrap.method,
        ),
        ("h2", "Verdicts"),
        (
            "table",
            ["claim", "verdict", "effect [95% interval]", "threshold", "margin"],
            [
                [
                    f"{v.claim}. {v.title}",
                    v.verdict,
                    rules.render_effect(v),
                    f"{v.threshold:g}",
                    f"{v.margin:g}",
                ]
                for v in verdict_list
            ],
        ),
    ]
    for v in verdict_list:
        items = [
            f"Effect: {v.effect_name}: {rules.render_effect(v)}",
            f"Rule: {v.rule}",
            f"Decided on: {', '.join(v.models_used) or 'no trained models'}",
        ]
        if v.excluded:
            items.append(f"Undertrained, so not allowed to decide: {'; '.join(v.excluded)}")
        items.append(f"What would change it: {v.would_change}")
        blocks += [("h2", f"{v.claim}. {v.title}: {v.verdict}"), ("list", items)]
        if v.measured:
            blocks.append(("list", list(v.measured)))
        if FIGURES[v.claim] in figures:
            blocks.append(("img", figures[FIGURES[v.claim]]))
    rotation = results.rotation
    blocks += [
        ("h2", "Rotation: accuracy by training augmentation and test rotation"),
        (
            "p",
            "The columns of Vector Neurons' Table 1 (train/test: z/z, z/SO(3), SO(3)/SO(3)) are the rows "
            "trained with z or so3 augmentation; every cell is the accuracy over seeds and test clouds with "
            "its 95% interval. The float64 invariance error is measured on a class-stratified subset.",
        ),
        (
            "table",
            ["variant", "trained with", "test: none", "test: z", "test: SO(3)", "invariance error"],
            [
                [
                    name,
                    row.augment,
                    *(_pct_interval(row.accuracy[m]) for m in ("none", "z", "so3")),
                    f"{row.invariance_error_float64:.1e}",
                ]
                for name, row in rotation.items()
            ],
        ),
    ]
    blocks += _resolution_blocks(results) + _proximity_blocks(results)
    cost_rows = [
        [
            r.model,
            r.resolution,
            r.tokens,
            f"{r.latency_ms:.1f} [{r.latency_ms_lo:.1f}, {r.latency_ms_hi:.1f}]",
            f"{r.latency_ms_median:.1f} [{r.latency_ms_q25:.1f}, {r.latency_ms_q75:.1f}]",
            f"{r.others_cpu:.1%}"
            + ("" if r.gpu_other_processes is None else f", GPU {r.gpu_other_processes}"),
            f"{r.own_cpu:.0%}",
            f"{r.peak_memory_mb:.1f}",
            f"{r.flops_total:.3g}",
            f"{r.attention_entries:,}",
        ]
        for r in results.cost.rows
    ]
    blocks += [
        ("h2", "Cost sweep"),
        (
            "p",
            "Setting: "
            + ", ".join(f"{k} {v}" for k, v in results.cost.setting.items())
            + f". Peak memory: {results.cost.rows[0].memory_method}.",
        ),
        (
            "p",
            "At each resolution the models were timed together in alternating short blocks, one block each "
            "per round in a seeded random order, so that load that comes and goes hits them alike. The "
            "latency that decides is the 20th percentile of a row's blocks, with a bootstrap interval: load "
            "from other processes only ever lengthens a block, so the fastest blocks are the least "
            "disturbed (the median and quartiles show the spread). ViT's and Mamba's exponent gap is fitted "
            "from their per-round latency ratios, in which a slowdown shared by a round cancels. Contention "
            "is what else the machine did meanwhile: the share of its CPU time other processes used (and, "
            "on a GPU, the other processes on it), and this process's share of what its threads could use. "
            "Claim 3 is inconclusive when other processes used more than "
            f"{rules.BUSY_CPU_THRESHOLD:.0%} of the CPUs while a fitted row was timed. Busiest here: "
            f"{_busiest_text(results.cost.busiest)}.",
        ),
        (
            "table",
            [
                "model",
                "px",
                "tokens",
                "latency ms, 20th pct [95% CI]",
                "median [IQR]",
                "other processes' CPU",
                "own CPU",
                "peak MB",
                "FLOPs (counted)",
                "attention entries",
            ],
            cost_rows,
        ),
        ("p", "The essay's table beside the exact numbers:"),
        (
            "table",
            [
                "px",
                "tokens",
                "attention entries",
                "essay's entries",
                "relative cost",
                "essay's relative cost",
            ],
            [
                [
                    r.resolution,
                    r.tokens,
                    f"{r.attention_entries:,}",
                    f"{r.attention_entries_essay:,.0f}",
                    f"{r.relative_cost:.1f}x",
                    f"{r.relative_cost_essay:g}x",
                ]
                for r in results.cost.essay
            ],
        ),
        ("h2", "Training"),
        *_training_blocks(plateau_rows, train_summary.get("slot_utilisation"), figures.get(TRAINING_FIGURE)),
        ("h2", "Where and how long"),
        ("list", hardware()),
        ("table", ["stage", "wall time (s)"], [[s, f"{t:.1f}"] for s, t in timings]),
    ]
    return blocks


def _choice_text(choice: DecisionChoice | None) -> str:
    if choice is None:
        return "none"
    lat = choice.latency_ms
    return (
        f"{choice.model}: {_pct_interval(choice.accuracy)}, {lat.value:.3g} ms [{lat.lo:.3g}, {lat.hi:.3g}]"
    )


def decision_line(row: DecisionRecord, budget_ms: float) -> str:
    """One decision row in a sentence (the stage's log)."""
    best = row.best.model if row.best else "none"
    fastest = row.fastest_within_interval.model if row.fastest_within_interval else "none"
    within = row.within_budget.model if row.within_budget else "none"
    return f"best {best}; fastest within its interval {fastest}; within {budget_ms:g} ms {within}"


def _decision_blocks(decision: Decision, results: Results, figures: dict[str, Path]) -> list[tuple]:
    """The decision table that opens the report, its rules, what it cannot know, and the trade-off figure."""
    budget = decision.latency_budget_ms
    rows = [
        [
            row.task,
            row.label,
            _choice_text(row.best),
            _choice_text(row.fastest_within_interval)
            + (
                f" (tied with the best: {', '.join(row.tied_with_best)})"
                if len(row.tied_with_best) > 1
                else ""
            )
            + (
                f" (as fast, within the measurement: {', '.join(row.as_fast)}; the most accurate of them)"
                if len(row.as_fast) > 1
                else ""
            ),
            _choice_text(row.within_budget)
            + ("" if row.within_budget else f" ({row.budget_note})")
            + (
                f" ({row.budget_edge} is more accurate, and its latency interval reaches {budget:g} ms: "
                "the measurement cannot say whether it fits)"
                if row.budget_edge
                else ""
            ),
            ", ".join(row.pareto_front) or "none",
            ", ".join(row.excluded) or "none",
        ]
        for row in decision.rows
    ]
    costs = [
        [
            name,
            row.task,
            f"{row.latency_ms:.3g} [{row.latency_ms_lo:.3g}, {row.latency_ms_hi:.3g}]",
            f"{row.latency_ms_q25:.3g}-{row.latency_ms_q75:.3g}",
            f"{row.throughput_per_s:,.0f}",
            f"{row.peak_memory_mb:.2f}",
            f"{row.parameters:,}",
            f"{row.checkpoint_bytes / 2**20:.2f}",
            "x".join(map(str, row.input_shape)),
        ]
        for name, row in results.deployment.models.items()
    ]
    batch = next(iter(results.deployment.models.values())).batch_size if costs else 0
    windows = next(iter(results.deployment.models.values())).windows if costs else 0
    blocks: list[tuple] = [
        ("h2", "Which backbone: accuracy against deployment cost"),
        ("p", decision.caveat),
        (
            "p",
            "For each task and condition, among the models that learned their task: the most accurate; the "
            "fastest whose accuracy interval overlaps the best's (the measurement cannot tell them apart); "
            "and the most accurate whose batch-1 latency is within report.latency_budget_ms = "
            f"{budget:g} ms. "
            "Accuracy over seeds and test samples [95% interval]; latency: the median over every timed "
            f"round (all models timed in turn, in {windows} windows of the stage, each in a fresh process) "
            "[95% interval of the median "
            "over windows and rounds]. The Pareto front lists the models no other is measurably the better "
            "choice than (not measurably slower nor less accurate, and measurably faster or more "
            "accurate), fastest first.",
        ),
        (
            "table",
            [
                "task",
                "condition",
                "best accuracy",
                "fastest within the best's interval",
                f"most accurate within {budget:g} ms",
                "Pareto front",
                "did not learn the task",
            ],
            rows,
        ),
    ]
    if TRADEOFF_FIGURE in figures:
        blocks.append(("img", figures[TRADEOFF_FIGURE]))
    blocks += [
        (
            "p",
            f"Every trained model's deployment cost on {decision.measured_on} ({decision.device}, "
            f"{decision.threads} threads), measured once per variant (its seeds share the architecture); "
            f"throughput at batch {batch}; "
            "peak memory is the allocator's above the start, at batch 1.",
        ),
        (
            "table",
            [
                "variant",
                "task",
                "latency ms, batch 1 [95% CI]",
                "IQR",
                "samples/s",
                "peak MiB",
                "parameters",
                "checkpoint MiB",
                "input",
            ],
            costs,
        ),
    ]
    return blocks


def bootstrap_settings(results: Results) -> BootstrapSettings:
    """The evaluate stage's resampler, so that the training table's intervals are made the same way."""
    return BootstrapSettings(results.bootstrap.resamples, results.bootstrap.seed, results.bootstrap.level)


def check_validation_records(train_summary: dict, source: Path) -> None:
    """A one-line DatasetError naming the file, variant, seed and epoch of a per-sample validation record
    (study.json's `val_correct`, `val_samples`) that cannot be read, before the report's bootstraps run. A
    study.json from before the records (no `val_correct`) passes: its rows say "no per-sample record"."""
    from perception.data.arrays import DatasetError

    for name, by_seed in (train_summary.get("variants") or {}).items():
        for seed, row in (by_seed or {}).items():
            record = row.get("val_correct")
            if record is None:
                continue
            where = f"{source}: variants.{name}.{seed}"
            count = row.get("val_samples")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise DatasetError(
                    f"{where}.val_samples is {count!r}, expected a whole number >= 1; rerun the train stage"
                )
            if not isinstance(record, list):
                raise DatasetError(f"{where}.val_correct is not a list of hex strings; rerun the train stage")
            for epoch, packed in enumerate(record, start=1):
                try:
                    unpack_correct(packed, count)
                except ValueError as err:
                    raise DatasetError(
                        f"{where}.val_correct[epoch {epoch}]: {err}; rerun the train stage"
                    ) from None


def _training_blocks(
    rows: list[Plateau], utilisation: float | None = None, figure: Path | None = None
) -> list[tuple]:
    """Each variant's best validation accuracy per seed, its epochs, and whether its validation curve had
    plateaued: the gain of the least-squares line through its last quarter of epochs, mean over seeds, with
    its interval over seeds and validation samples, called flat, rising or undecided. A variant below the
    adequacy floor says so beside its call: a model at chance flips its answers between epochs, so its
    call says little, and one short of the floor may still be rising. `figure`: the curves, drawn."""
    table: list[list[str]] = []
    called: dict[str, list[str]] = {call: [] for call in PLATEAU_CALLS}
    short: list[str] = []  # below the adequacy floor
    for row in rows:
        called[row.call].append(row.variant)
        note = ""
        if row.below_floor is not None:
            fit = row.below_floor
            note = f"; below the adequacy floor ({_pct(fit.accuracy.value)} < {_pct(fit.floor)})"
            short.append(row.variant)
        gain = row.gain
        table.append(
            [
                row.variant,
                str(row.epochs),
                ", ".join(f"seed {seed}: {_pct(best)}" for seed, best in row.best.items()),
                f"{gain.value:+.1f} [{gain.lo:+.1f}, {gain.hi:+.1f}]" if gain else "no per-sample record",
                ", ".join(f"{g:+.1f}" for g in row.seed_gains),
                row.call + note,
            ]
        )
    flat, rising, undecided = (called[c] for c in PLATEAU_CALLS)
    line = f"{PLATEAU_POINTS:g} point"
    if table and len(flat) == len(table):
        summary = (
            f"Every variant's validation curve gains less than {line} over its last quarter of epochs, "
            "interval and all: trained to its plateau."
        )
    else:
        parts = [
            f"Flat, the interval under {line}: {', '.join(flat) or 'none'}.",
            f"Still rising, the interval above zero and reaching {line}: {', '.join(rising) or 'none'}"
            + (" (more epochs would change their numbers)." if rising else "."),
        ]
        if undecided:
            parts.append(
                f"Undecided, the interval from zero or below to {line} or more: {', '.join(undecided)} "
                "(the validation split cannot tell a flat curve from a rising one at these seeds)."
            )
        summary = " ".join(parts)
    if short:
        summary += (
            f" Below the adequacy floor, where a call says little (a model at chance flips its answers "
            f"between epochs): {', '.join(short)}."
        )
    summary += (
        " The gain is that of the least-squares line through the last quarter of the validation curve (mean "
        "over seeds); its interval is the study's bootstrap, over training seeds and validation samples."
    )
    if utilisation is not None:
        summary += (
            f" The trials kept {utilisation:.0%} of the run's slots busy (their own time over wall time x "
            "concurrent slots)."
        )
    return [
        ("p", summary),
        *([("img", figure)] if figure is not None else []),
        (
            "table",
            [
                "variant",
                "epochs",
                "best validation accuracy by seed",
                "last-quarter gain, points [95% CI]",
                "by seed",
                "plateau",
            ],
            table,
        ),
    ]


def _points_interval(estimate: Estimate) -> str:
    return f"{100 * estimate.value:+.1f} [{100 * estimate.lo:.1f}, {100 * estimate.hi:.1f}]"


def _resolution_blocks(results: Results) -> list[tuple]:
    """Claim 2's tables: accuracy on every test set, and the (a) / (b) / (c) decomposition of the drops."""
    canvas = results.canvas
    resolution = results.resolution
    if not resolution:
        return []
    sets = canvas.test_sets  # in, (a) (b) (c)
    train_res = canvas.train_resolution
    blocks: list[tuple] = [
        ("h2", "Resolution: the paired test sets"),
        (
            "p",
            f"Objects rendered at {canvas.object_size} px, placed at random positions on the "
            f"{train_res} px training canvas (`in`). At every test canvas R, from the same test instances: "
            "(a) `fov_R` the same field of view with R / "
            f"{train_res} times the pixels; (b) `centre_R`, `corner_R` the object at its training pixel size "
            "on the larger canvas (new grid positions only); (c) `scaled_R` the object scaled by the same "
            f"factor on the {train_res} px canvas (apparent scale only). Accuracy with 95% intervals.",
        ),
        (
            "table",
            ["variant", *sets],
            [[name, *(_pct_interval(row.accuracy[k]) for k in sets)] for name, row in resolution.items()],
        ),
    ]
    for canvas_px in canvas.canvases:
        key = str(canvas_px)
        blocks += [
            ("p", f"Accuracy drops from `in` at {canvas_px} px, points [95% interval]: is (a) = (b) + (c)?"),
            (
                "table",
                [
                    "variant",
                    "encoding",
                    "(a) fov",
                    "(b) canvas",
                    "(c) scaled",
                    "(b) + (c)",
                    "(a) - ((b) + (c))",
                ],
                [
                    [name, row.encoding] + [_points_interval(d) for _, d in row.drops[key]]
                    for name, row in resolution.items()
                ],
            ),
        ]
    return blocks


def _proximity_blocks(results: Results) -> list[tuple]:
    """Claim 1's table: every proximity-task model with its scan order's locality."""
    models = results.serialisation.models
    if not models:
        return []
    task = results.serialisation.task
    return [
        ("h2", "Serialisation: the proximity task"),
        (
            "p",
            f"Task {task.get('task')!r} on {task.get('size')}x{task.get('size')} px, one token per pixel: "
            f"{task.get('segments')} segments of {task.get('segment_length')} px, all solid (label 1) or all "
            f"broken by a one-pixel gap (label 0), all horizontal or all vertical, and "
            f"{task.get('distractors')} isolated pixels; {results.test_samples.proximity} test "
            "images. Locality: the fraction of 2D-neighbour pairs within 4 tokens (one conv1d window) in "
            "the order's closest direction, and their geometric-mean distance in the sequence. Accuracy "
            "is also split by the segments' axis: row-major order keeps horizontal neighbours together, not "
            "vertical ones, so a task that measures 2D proximity shows the difference there.",
        ),
        (
            "table",
            [
                "variant",
                "scan order",
                "accuracy [95% interval]",
                "horizontal segments",
                "vertical segments",
                "neighbours within 4",
                "geo-mean gap",
            ],
            [
                [
                    name,
                    row.scan_order or "attention (no order)",
                    _pct_interval(row.accuracy),
                    _pct_interval(row.by_orientation.get("horizontal")),
                    _pct_interval(row.by_orientation.get("vertical")),
                    f"{row.locality.grid_nbr_within_window_frac:.3f}" if row.locality else "n/a",
                    f"{row.locality.grid_nbr_seq_dist_geomean:.2f}" if row.locality else "n/a",
                ]
                for name, row in models.items()
            ],
        ),
    ]


def render_markdown(blocks: list[tuple], relative_to: Path) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            out.append(f"# {block[1]}\n")
        elif kind == "h2":
            out.append(f"## {block[1]}\n")
        elif kind == "p":
            out.append(block[1] + "\n")
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in block[1]) + "\n")
        elif kind == "table":
            header, rows = block[1], block[2]
            lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
            out.append("\n".join(lines) + "\n")
        elif kind == "img":
            path = Path(block[1])
            out.append(f"![{path.stem}]({os.path.relpath(path, relative_to)})\n")
    return "\n".join(out)


def render_html(blocks: list[tuple]) -> str:
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{html.escape(str(i))}</li>" for i in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in block[1])
            rows = "".join(
                "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in block[2]
            )
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif kind == "img":
            data = base64.b64encode(Path(block[1]).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(Path(block[1]).stem)}" src="data:image/png;base64,{data}">')
    style = (
        "body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.2em .6em}"
        "img{max-width:100%}"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Study report</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
