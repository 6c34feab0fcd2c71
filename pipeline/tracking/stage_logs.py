"""What the evaluate and report stages log to the study's MLflow runs, through `pipeline.tracking.review`'s
helpers.

- evaluate: each evaluated model's test numbers on its own trial run, the cost sweep, tables and figures.
- report: the report's files and its training curves, each claim's verdict (tag) and effect (metrics),
  and the verdicts as the experiment's and the parent run's description.

Only the stage's own process writes through these; each call is retried by `mlflow_store.retrying`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.evaluation import verdicts as rules
from pipeline.evaluation.results import CostRow
from pipeline.outputs import read_json
from pipeline.tracking import review
from pipeline.tracking.store import retrying


def trial_runs(train_dir: Path) -> dict[tuple[str, int], str]:
    """(variant, seed) -> the MLflow run of the trial whose checkpoint was evaluated (study.json)."""
    study = read_json(train_dir / "study.json", "train")
    return {
        (variant, int(seed)): best.get("mlflow_run_id", "")
        for variant, by_seed in study.get("variants", {}).items()
        for seed, best in by_seed.items()
    }


def log_evaluation(
    tracking: dict,
    per_model: dict[str, dict[int, dict[str, float]]],
    train_dir: Path,
    cost_rows: list[CostRow],
    tables: list[Path],
    figures: list[Path],
    derived_inputs: list,
    wait_s: float,
) -> None:
    """`_log_evaluation`, retried while the store is away; the trials' runs from the train stage's record."""
    runs = trial_runs(train_dir)
    rows = [row.model_dump() for row in cost_rows]
    retrying(
        lambda: _log_evaluation(tracking, per_model, runs, rows, tables, figures, derived_inputs),
        "logging the evaluation",
        tracking["tracking_uri"],
        wait_s,
        print,
    )


def _log_evaluation(
    tracking: dict,
    per_model: dict[str, dict[int, dict[str, float]]],
    runs: dict[tuple[str, int], str],
    cost_rows: list[dict[str, Any]],
    tables: list[Path],
    figures: list[Path],
    derived_inputs: list,
) -> None:
    """Each evaluated model's test numbers on its own run (a derived reading, like `vit-learned_fixed`, on a
    run of its own beside the trial it reads); the cost sweep as a run per model; tables and figures on the
    study's parent run. The claim-level numbers go to the parent in the report stage."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking["tracking_uri"])
    parent_id = tracking["parent_run_id"]
    source = review.source_tags("evaluate", client.get_run(parent_id).data.tags.get("git_commit", ""))
    for variant, by_seed in per_model.items():
        for seed, metrics in by_seed.items():
            run_id = runs.get((variant, seed))
            if not run_id:  # not trained: read from another variant's weights
                tags = {"variant": variant, "seed": str(seed), "kind": "derived", **source}
                run_id = review.child_run(client, parent_id, f"{variant}-s{seed}", tags, derived_inputs)
            review.log_metrics(client, run_id, metrics)
    review.log_cost_sweep(client, parent_id, cost_rows, source)
    for table in tables:
        client.log_artifact(parent_id, str(table), "evaluation")
    review.log_figures(client, parent_id, figures)


def log_report(
    mlflow: dict[str, str],
    out: Path,
    verdict_list: list[rules.Verdict],
    wait_s: float,
    figures: Sequence[Path] = (),
) -> str:
    """The report's files, its own `figures` (the training curves) and verdicts on the study's parent run
    (retried while the store is away); the link where a reviewer lands."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow["tracking_uri"])

    parent_id = mlflow["parent_run_id"]
    urls: list[str] = []

    def log_report() -> None:
        for name in ("report.md", "report.html", "verdicts.json", "decision.json"):
            client.log_artifact(parent_id, str(out / name), "report")
        review.log_figures(client, parent_id, list(figures), "report/figures")
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
            f"Claim {v.claim}, {v.title}: **{v.verdict}**, effect {rules.render_effect(v)}"
            for v in verdict_list
        ]
        description = review.study_description(lines, url)
        review.mark_experiment(client, experiment_id, description)
        client.set_tag(parent_id, "mlflow.note.content", description)
        urls[:] = [url]

    retrying(log_report, "logging the report", mlflow["tracking_uri"], wait_s, print)
    return urls[0]
