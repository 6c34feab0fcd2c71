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
from pathlib import Path
from typing import Any

from perception.data.arrays import DatasetError
from pipeline import review
from pipeline import verdicts as rules
from pipeline.evidence import load_evidence
from pipeline.mlflow_store import check_reachable, retrying
from pipeline.outputs import atomic_output_dir, read_json

CLAIMS = {
    "serialisation": (1, "Flattening a 2D image into a 1D sequence breaks spatial proximity"),
    "position_embedding": (2, "Learned position embeddings do not transfer across resolutions"),
    "cost": (3, "Attention is quadratic in tokens; SSMs are linear"),
    "rotation": (4, "Models without 3D structure fail under 3D rotations; equivariant ones do not"),
}
RULES = {
    "serialisation": rules.claim_serialisation,
    "position_embedding": rules.claim_position_embedding,
    "cost": rules.claim_cost,
    "rotation": rules.claim_rotation,
}
FIGURES = {
    "serialisation": "serialisation.png",
    "position_embedding": "resolution_accuracy.png",
    "cost": "cost_vs_tokens.png",
    "rotation": "rotation.png",
}


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _pct_interval(estimate: dict[str, float] | None) -> str:
    if not estimate or "value" not in estimate:
        return "n/a"
    return f"{100 * estimate['value']:.1f}% [{100 * estimate['lo']:.1f}, {100 * estimate['hi']:.1f}]"


def verdicts(results: dict[str, Any]) -> list[rules.Verdict]:
    """Each claim's verdict from its typed evidence in results.json, by the rules of `pipeline.verdicts`."""
    out = []
    for name, (number, title) in CLAIMS.items():
        raw = results["evidence"].get(name)
        if raw is None:
            out.append(rules.no_evidence(number, title, "the evaluation holds no measurement for this claim"))
        else:
            out.append(RULES[name](load_evidence(name, raw)))
    return out


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
    for stage in ("prepare-points", "prepare-images", "prepare-proximity", "train", "evaluate", "report"):
        path = timings_dir / f"{stage}.json"
        if path.is_file():
            rows.append((stage, json.loads(path.read_text())["wall_seconds"]))
    return rows


def _effect_text(v: rules.Verdict) -> str:
    return rules.render_effect(v) if v.effect is not None else "not measured"


def _blocks(results, verdict_list, train_summary, timings, figures) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"p", text), ("list", items), ("table", header, rows), ("img", path)"""
    mlflow = results.get("mlflow") or train_summary.get("mlflow") or {}
    seeds = results.get("seeds", [])
    blocks: list[tuple] = [
        ("h1", "Vision backbones for robot perception: the four claims, measured"),
        (
            "p",
            f"MLflow run {mlflow.get('parent_run_id', 'n/a')} "
            f"in experiment {mlflow.get('experiment', 'n/a')} "
            f"({mlflow.get('tracking_uri', 'n/a')}); data seed {results['seed']}, training seeds "
            f"{', '.join(map(str, seeds))}; {results['test_samples']['points']} test clouds "
            f"({results['points_per_cloud']} points each, as trained), "
            f"{results['test_samples']['images']} test images, {results['num_classes']} classes.",
        ),
        (
            "p",
            "How to read it. A verdict judges one effect against a stated threshold: it holds when the whole "
            "95% interval lies beyond the threshold, does not hold when the whole interval lies within the "
            "equivalence margin of no effect, and is inconclusive otherwise. Only models that learned their "
            "task (in-distribution accuracy at least halfway from chance to 100%) may decide. Intervals: "
            + results["bootstrap"]["method"],
        ),
        ("h2", "Verdicts"),
        (
            "table",
            ["claim", "verdict", "effect [95% interval]", "threshold", "margin"],
            [
                [f"{v.claim}. {v.title}", v.verdict, _effect_text(v), f"{v.threshold:g}", f"{v.margin:g}"]
                for v in verdict_list
            ],
        ),
    ]
    for v, name in zip(verdict_list, CLAIMS, strict=True):
        items = [
            f"Effect: {v.effect_name}: {_effect_text(v)}",
            f"Rule: {v.rule}",
            f"Decided on: {', '.join(v.models_used) or 'no trained models'}",
        ]
        if v.excluded:
            items.append(f"Undertrained, so not allowed to decide: {'; '.join(v.excluded)}")
        items.append(f"What would change it: {v.would_change}")
        blocks += [("h2", f"{v.claim}. {v.title}: {v.verdict}"), ("list", items)]
        if v.measured:
            blocks.append(("list", list(v.measured)))
        if FIGURES[name] in figures:
            blocks.append(("img", figures[FIGURES[name]]))
    rotation = results["rotation"]
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
                    row["augment"],
                    *(_pct_interval(row["accuracy"][m]) for m in ("none", "z", "so3")),
                    f"{row['invariance_error_float64']:.1e}",
                ]
                for name, row in rotation.items()
            ],
        ),
    ]
    blocks += _resolution_blocks(results) + _proximity_blocks(results)
    cost_rows = [
        [
            r["model"],
            r["resolution"],
            r["tokens"],
            f"{r['latency_ms']:.1f} [{r['latency_ms_lo']:.1f}, {r['latency_ms_hi']:.1f}]",
            f"{r['peak_memory_mb']:.1f}",
            f"{r['flops_total']:.3g}",
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
                "latency ms, median [IQR]",
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
            ["variant", "best validation accuracy per seed"],
            [
                [
                    name,
                    ", ".join(f"seed {seed}: {_pct(row['val_accuracy'])}" for seed, row in by_seed.items()),
                ]
                for name, by_seed in sorted(train_summary.get("variants", {}).items())
            ],
        ),
        ("h2", "Where and how long"),
        ("list", hardware()),
        ("table", ["stage", "wall time (s)"], [[s, f"{t:.1f}"] for s, t in timings]),
    ]
    return blocks


def _points_interval(estimate: dict[str, float]) -> str:
    return f"{100 * estimate['value']:+.1f} [{100 * estimate['lo']:.1f}, {100 * estimate['hi']:.1f}]"


def _resolution_blocks(results: dict[str, Any]) -> list[tuple]:
    """Claim 2's tables: accuracy on every test set, and the (a) / (b) / (c) decomposition of the drops."""
    canvas = results.get("canvas")
    resolution = results["resolution"]
    if not canvas or not resolution:
        return []
    sets = canvas.get("test_sets") or list(next(iter(resolution.values()))["accuracy"])  # in, (a) (b) (c)
    train_res = canvas["train_resolution"]
    blocks: list[tuple] = [
        ("h2", "Resolution: the paired test sets"),
        (
            "p",
            f"Objects rendered at {canvas['object_size']} px, placed at random positions on the "
            f"{train_res} px training canvas (`in`). At every test canvas R, from the same test instances: "
            "(a) `fov_R` the same field of view with R / "
            f"{train_res} times the pixels; (b) `centre_R`, `corner_R` the object at its training pixel size "
            "on the larger canvas (new grid positions only); (c) `scaled_R` the object scaled by the same "
            f"factor on the {train_res} px canvas (apparent scale only). Accuracy with 95% intervals.",
        ),
        (
            "table",
            ["variant", *sets],
            [[name, *(_pct_interval(row["accuracy"][k]) for k in sets)] for name, row in resolution.items()],
        ),
    ]
    for canvas_px in canvas["canvases"]:
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
                    [name, row["encoding"]]
                    + [
                        _points_interval(row["drops"][key][k])
                        for k in ("a", "b", "c", "b_plus_c", "a_minus_b_c")
                    ]
                    for name, row in resolution.items()
                ],
            ),
        ]
    return blocks


def _proximity_blocks(results: dict[str, Any]) -> list[tuple]:
    """Claim 1's table: every proximity-task model with its scan order's locality."""
    serialisation = results.get("serialisation", {})
    models = serialisation.get("models")
    if not models:
        return []
    task = serialisation.get("task", {})
    return [
        ("h2", "Serialisation: the proximity task"),
        (
            "p",
            f"Task {task.get('task')!r} on {task.get('size')}x{task.get('size')} px, one token per pixel: "
            f"{task.get('segments')} segments of {task.get('segment_length')} px, all solid (label 1) or all "
            f"broken by a one-pixel gap (label 0), all horizontal or all vertical, and "
            f"{task.get('distractors')} isolated pixels; {results['test_samples'].get('proximity')} test "
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
                    row["scan_order"] or "attention (no order)",
                    _pct_interval(row["accuracy"]),
                    _pct_interval(row.get("by_orientation", {}).get("horizontal")),
                    _pct_interval(row.get("by_orientation", {}).get("vertical")),
                    f"{row['locality']['grid_nbr_within_window_frac']:.3f}" if row["locality"] else "n/a",
                    f"{row['locality']['grid_nbr_seq_dist_geomean']:.2f}" if row["locality"] else "n/a",
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


def report(
    evaluation_dir: Path, train_dir: Path, timings_dir: Path, out: Path, wait_s: float = 120.0
) -> list[rules.Verdict]:
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
        (folder / "verdicts.json").write_text(
            json.dumps({"claims": [v.as_dict() for v in verdict_list]}, indent=2) + "\n"
        )
    for v in verdict_list:
        print(f"report: claim {v.claim} ({v.title}): {v.verdict}, effect {_effect_text(v)}")
    if mlflow.get("parent_run_id"):
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=mlflow["tracking_uri"])

        parent_id = mlflow["parent_run_id"]
        urls: list[str] = []

        def log_report() -> None:
            for name in ("report.md", "report.html", "verdicts.json"):
                client.log_artifact(parent_id, str(out / name), "report")
            claim_metrics = {}
            for v in verdict_list:
                client.set_tag(parent_id, f"claim_{v.claim}", v.verdict)
                if v.effect is not None:
                    name = f"claim_{v.claim}_effect"
                    claim_metrics.update(
                        {name: v.effect.value, f"{name}_lo": v.effect.lo, f"{name}_hi": v.effect.hi}
                    )
            review.log_metrics(client, parent_id, claim_metrics)
            # The verdicts where a reviewer lands: the experiment's and the parent run's description.
            experiment_id = client.get_run(parent_id).info.experiment_id
            url = review.review_url(mlflow["tracking_uri"], experiment_id)
            lines = [
                f"Claim {v.claim}, {v.title}: **{v.verdict}**, effect {_effect_text(v)}" for v in verdict_list
            ]
            description = review.study_description(lines, url)
            review.mark_experiment(client, experiment_id, description)
            client.set_tag(parent_id, "mlflow.note.content", description)
            urls[:] = [url]

        retrying(log_report, "logging the report", mlflow["tracking_uri"], wait_s, print)
        served = (
            ""
            if mlflow["tracking_uri"].startswith("http")
            else (f" (serve the store first: mlflow server --backend-store-uri {mlflow['tracking_uri']})")
        )
        print(f"report: review in MLflow at {urls[0]}{served}")
    print(f"report: {out / 'report.md'}, {out / 'report.html'}")
    return verdict_list
