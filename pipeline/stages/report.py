"""Stage `report`: a verdict on each of the four claims, computed from the evaluation's numbers by rules.

Writes `<out>/report.md` and a self-contained `<out>/report.html` (figures inlined), and logs both to the
study's MLflow parent run. Each verdict is `holds`, `does not hold` or `inconclusive`, with the rule that
decided it written next to it, so a reader can check the call against the numbers.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perception.data.arrays import DatasetError
from pipeline.mlflow_store import check_reachable, retrying
from pipeline.outputs import atomic_output_dir, read_json

# Thresholds of the rules, in accuracy points (percent) where they are accuracies.
ROTATION_TOLERANCE = 3.0  # an invariant model's SO(3) accuracy within this of its unrotated accuracy
ROTATION_DROP = 10.0  # a model without 3D structure "fails" if SO(3) costs at least this much
RESOLUTION_DROP = 5.0  # a position embedding "does not transfer" if accuracy falls at least this much
FLOP_SLOPE_QUADRATIC = 1.3  # log-log FLOPs slope over the largest sizes: attention's quadratic term dominates
FLOP_SLOPE_LINEAR = 1.15  # ... and a linear model stays below this


@dataclass
class Verdict:
    claim: str
    verdict: str  # holds | does not hold | inconclusive
    rule: str
    measured: list[str] = field(default_factory=list)


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def claim_serialisation(results: dict[str, Any]) -> Verdict:
    ser = results["serialisation"]
    orders = ser["orders"]
    grids = list(orders["rowmajor"])
    largest = grids[-1]
    row = orders["rowmajor"][largest]
    measured = [
        f"{order}, {grid.replace('locality_', '')} grid: "
        f"{100 * stats['grid_nbr_within_window_frac']:.0f}% of "
        f"2D neighbours within 4 tokens in 1D, mean gap {stats['grid_nbr_seq_dist_mean']:.1f}, "
        f"max gap {stats['grid_nbr_seq_dist_max']:.0f}"
        for order in orders
        for grid, stats in orders[order].items()
    ]
    accuracy = ser["mamba_accuracy"]
    if accuracy:
        measured.append(
            "Mamba-hybrid accuracy by order: " + ", ".join(f"{o} {_pct(a)}" for o, a in accuracy.items())
        )
    broken = row["grid_nbr_within_window_frac"] < 0.9 and row["grid_nbr_seq_dist_max"] > 4
    verdict = "holds" if broken else "does not hold"
    rule = (
        "holds if, in row-major order on the largest grid, fewer than 90% of 2D neighbour pairs stay within "
        "a 4-token window (Mamba's conv width) and some pair lands more than 4 tokens apart. Accuracy "
        "differences between orders are reported, not judged: at this data size they are within sampling "
        "error unless the table says otherwise."
    )
    return Verdict(
        "1. Flattening a 2D image into a 1D sequence breaks spatial proximity", verdict, rule, measured
    )


def claim_position_embedding(results: dict[str, Any]) -> Verdict:
    res = results["resolution"]
    rule = (
        f"ViT uses the standard help (bicubic resampling of its learned grid). Holds if ViT loses at least "
        f"{RESOLUTION_DROP:.0f} points from the training resolution to the largest test resolution and at "
        f"least {RESOLUTION_DROP:.0f} points more than Mamba-hybrid (no position embedding) loses; does not "
        "hold if ViT loses under 2 points; inconclusive otherwise or with one resolution."
    )
    vit = [r for r in res.values() if r["family"] == "vit"]
    mamba = [r for r in res.values() if r["family"] == "mamba_hybrid"]
    if not vit or len(vit[0]["accuracy"]) < 2:
        return Verdict(
            "2. Learned position embeddings do not transfer across resolutions",
            "inconclusive",
            rule,
            ["no ViT or a single test resolution"],
        )

    def drop(row: dict) -> tuple[float, str, str]:
        train, largest = str(row["train_resolution"]), max(row["accuracy"], key=int)
        return 100 * (row["accuracy"][train] - row["accuracy"][largest]), train, largest

    vit_drop, train, largest = drop(vit[0])
    mamba_drops = [drop(r)[0] for r in mamba]
    mamba_drop = sum(mamba_drops) / len(mamba_drops) if mamba_drops else 0.0
    measured = [
        f"{name}: "
        + ", ".join(f"{r} px {_pct(a)}" for r, a in sorted(row["accuracy"].items(), key=lambda x: int(x[0])))
        for name, row in res.items()
    ]
    measured.append(
        f"from {train} px to {largest} px: ViT loses {vit_drop:.1f} points, Mamba-hybrid {mamba_drop:.1f} "
        "(mean over scan orders)"
    )
    if vit_drop >= RESOLUTION_DROP and vit_drop - mamba_drop >= RESOLUTION_DROP:
        verdict = "holds"
    elif vit_drop < 2.0:
        verdict = "does not hold"
    else:
        verdict = "inconclusive"
    return Verdict(
        "2. Learned position embeddings do not transfer across resolutions", verdict, rule, measured
    )


def claim_cost(results: dict[str, Any]) -> Verdict:
    cost = results["cost"]
    fits = cost["fits"]
    rule = (
        f"Holds if, between the two largest token counts, ViT's FLOPs grow with a log-log slope of at least "
        f"{FLOP_SLOPE_QUADRATIC} while pure Mamba's stay at or below {FLOP_SLOPE_LINEAR}, and ViT's measured "
        f"latency slope exceeds Mamba's; does not hold if ViT's FLOPs slope is below {FLOP_SLOPE_LINEAR}; "
        "inconclusive otherwise. Attention-matrix entries grow as tokens squared by construction."
    )
    measured = []
    for model, fit in fits.items():
        measured.append(
            f"{model}: fitted exponent latency {fit['latency_ms']['exponent']:.2f}, FLOPs "
            f"{fit['flops_total']['exponent']:.2f}, memory {fit['peak_memory_mb']['exponent']:.2f}; "
            f"neighbour latency slopes {', '.join(f'{s:.2f}' for s in fit['latency_ms']['slopes'])}"
        )
    if "vit" not in fits or "mamba" not in fits:
        return Verdict("3. Attention is quadratic in tokens; SSMs are linear", "inconclusive", rule, measured)
    vit_flops = fits["vit"]["flops_total"]["slopes"][-1]
    mamba_flops = fits["mamba"]["flops_total"]["slopes"][-1]
    vit_latency = fits["vit"]["latency_ms"]["slopes"][-1]
    mamba_latency = fits["mamba"]["latency_ms"]["slopes"][-1]
    measured.append(
        f"largest step: FLOPs slope ViT {vit_flops:.2f} vs Mamba {mamba_flops:.2f}; latency slope ViT "
        f"{vit_latency:.2f} vs Mamba {mamba_latency:.2f}"
    )
    if vit_flops >= FLOP_SLOPE_QUADRATIC and mamba_flops <= FLOP_SLOPE_LINEAR and vit_latency > mamba_latency:
        verdict = "holds"
    elif vit_flops < FLOP_SLOPE_LINEAR:
        verdict = "does not hold"
    else:
        verdict = "inconclusive"
    return Verdict("3. Attention is quadratic in tokens; SSMs are linear", verdict, rule, measured)


def claim_rotation(results: dict[str, Any]) -> Verdict:
    rot = results["rotation"]
    rule = (
        f"Holds if every equivariant (e3nn) model keeps its SO(3) accuracy within {ROTATION_TOLERANCE:.0f} "
        f"points of its unrotated accuracy and every model without 3D structure trained without rotation "
        f"augmentation loses at least {ROTATION_DROP:.0f} points under SO(3); does not hold if an e3nn model "
        f"loses more than {ROTATION_TOLERANCE:.0f} points or no baseline loses {ROTATION_TOLERANCE:.0f}; "
        "inconclusive otherwise."
    )
    measured, e3nn_ok, baseline_drops = [], [], []
    for name, row in rot.items():
        none, so3 = row["modes"]["none"]["accuracy"], row["modes"]["so3"]["accuracy"]
        z = row["modes"]["z"]["accuracy"]
        measured.append(
            f"{name}: none {_pct(none)}, about z {_pct(z)}, SO(3) {_pct(so3)} "
            f"(± {100 * row['modes']['so3']['accuracy_std']:.1f}), "
            f"invariance error {row['invariance_error_float64']:.1e}"
        )
        drop = 100 * (none - so3)
        if row["family"] == "e3nn":
            e3nn_ok.append(drop <= ROTATION_TOLERANCE)
        elif row["augment"] == "none":
            baseline_drops.append(drop)
    if not e3nn_ok or not baseline_drops:
        verdict = "inconclusive"
    elif all(e3nn_ok) and min(baseline_drops) >= ROTATION_DROP:
        verdict = "holds"
    elif not all(e3nn_ok) or max(baseline_drops) < ROTATION_TOLERANCE:
        verdict = "does not hold"
    else:
        verdict = "inconclusive"
    return Verdict(
        "4. Models without 3D structure fail under 3D rotations; equivariant ones do not",
        verdict,
        rule,
        measured,
    )


def verdicts(results: dict[str, Any]) -> list[Verdict]:
    return [
        claim_serialisation(results),
        claim_position_embedding(results),
        claim_cost(results),
        claim_rotation(results),
    ]


def hardware() -> list[str]:
    import torch

    lines = [
        f"{platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}",
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"{torch.get_num_threads()} torch threads",
    ]
    lines.append(f"GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "GPU: none")
    return lines


def stage_times(timings_dir: Path) -> list[tuple[str, float]]:
    rows = []
    for stage in ("prepare-points", "prepare-images", "train", "evaluate", "report"):
        path = timings_dir / f"{stage}.json"
        if path.is_file():
            rows.append((stage, json.loads(path.read_text())["wall_seconds"]))
    return rows


def _blocks(results, verdict_list, train_summary, timings, figures) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"p", text), ("list", items), ("table", header, rows), ("img", path)"""
    mlflow = results.get("mlflow") or train_summary.get("mlflow") or {}
    blocks: list[tuple] = [
        ("h1", "Vision backbones for robot perception: the four claims, measured"),
        (
            "p",
            f"MLflow run {mlflow.get('parent_run_id', 'n/a')} "
            f"in experiment {mlflow.get('experiment', 'n/a')} "
            f"({mlflow.get('tracking_uri', 'n/a')}); seed {results['seed']}.",
        ),
        ("h2", "Verdicts"),
        ("table", ["claim", "verdict"], [[v.claim, v.verdict] for v in verdict_list]),
    ]
    for v in verdict_list:
        blocks += [("h2", f"{v.claim}: {v.verdict}"), ("p", "Rule: " + v.rule), ("list", v.measured)]
        figure = {
            "1": "serialisation.png",
            "2": "resolution_accuracy.png",
            "3": "cost_vs_tokens.png",
            "4": "rotation.png",
        }[v.claim[0]]
        if figure in figures:
            blocks.append(("img", figures[figure]))
    cost_rows = [
        [
            r["model"],
            r["resolution"],
            r["tokens"],
            f"{r['latency_ms']:.1f}",
            f"{r['latency_ms_min']:.1f}-{r['latency_ms_max']:.1f}",
            f"{r['peak_memory_mb']:.1f}",
            f"{r['flops_total']:.3g}",
            f"{r['scan_flops']:.3g}",
            f"{r['attention_entries']:,}",
        ]
        for r in results["cost"]["rows"]
    ]
    blocks += [
        ("h2", "Cost sweep"),
        (
            "p",
            "Setting: "
            + ", ".join(f"{k} {v}" for k, v in results["cost"]["setting"].items())
            + f". Peak memory: {results['cost']['rows'][0].get('memory_method', '')}.",
        ),
        (
            "table",
            [
                "model",
                "px",
                "tokens",
                "latency ms (median)",
                "min-max",
                "peak MB",
                "FLOPs",
                "scan FLOPs",
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
                    r["resolution"],
                    r["tokens"],
                    f"{r['attention_entries']:,}",
                    f"{r['attention_entries_essay']:,.0f}",
                    f"{r['relative_cost']:.1f}x",
                    f"{r['relative_cost_essay']:g}x",
                ]
                for r in results["cost"]["essay"]
            ],
        ),
        ("h2", "Training"),
        (
            "table",
            ["variant", "best validation accuracy"],
            [[k, _pct(v["val_accuracy"])] for k, v in sorted(train_summary.get("variants", {}).items())],
        ),
        ("h2", "Where and how long"),
        ("list", hardware()),
        ("table", ["stage", "wall time (s)"], [[s, f"{t:.1f}"] for s, t in timings]),
    ]
    return blocks


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


def report(
    evaluation_dir: Path, train_dir: Path, timings_dir: Path, out: Path, wait_s: float = 120.0
) -> list[Verdict]:
    results = read_json(evaluation_dir / "results.json", "evaluate")
    study_path = train_dir / "study.json"
    train_summary = read_json(study_path, "train") if study_path.is_file() else {}
    mlflow = results.get("mlflow") or {}
    if mlflow.get("parent_run_id"):
        check_reachable(mlflow["tracking_uri"], f"the study's tracking store ({study_path})")
    try:
        verdict_list = verdicts(results)
    except (KeyError, TypeError, ValueError) as err:
        raise DatasetError(
            f"{evaluation_dir / 'results.json'}: not the evaluate stage's results ({type(err).__name__}: "
            f"{err}); rerun the evaluate stage"
        ) from None
    figures = {p.name: p for p in sorted((evaluation_dir / "figures").glob("*.png"))}
    blocks = _blocks(results, verdict_list, train_summary, stage_times(timings_dir), figures)
    with atomic_output_dir(out) as folder:
        # The report folder stands alone: the Markdown's figures are copied beside it.
        (folder / "figures").mkdir()
        for name, path in figures.items():
            shutil.copyfile(path, folder / "figures" / name)
        (folder / "report.md").write_text(render_markdown(blocks, evaluation_dir))
        (folder / "report.html").write_text(render_html(blocks))
        (folder / "verdicts.json").write_text(json.dumps([v.__dict__ for v in verdict_list], indent=2) + "\n")
    for v in verdict_list:
        print(f"report: {v.claim}: {v.verdict}")
    if mlflow.get("parent_run_id"):
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=mlflow["tracking_uri"])

        def log_report() -> None:
            for name in ("report.md", "report.html", "verdicts.json"):
                client.log_artifact(mlflow["parent_run_id"], str(out / name), "report")
            for i, v in enumerate(verdict_list, 1):
                client.set_tag(mlflow["parent_run_id"], f"claim_{i}", v.verdict)

        retrying(log_report, "logging the report", mlflow["tracking_uri"], wait_s, print)
    print(f"report: {out / 'report.md'}, {out / 'report.html'}")
    return verdict_list
