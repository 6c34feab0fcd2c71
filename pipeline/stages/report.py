"""Stage `report`: a verdict on each of the four claims, computed from the evaluation's numbers by rules.

Reads `<evaluation>/results.json` (`pipeline.evaluation.results.Results`); writes `<out>/report.md`, a
self-contained `<out>/report.html` (figures inlined), `<out>/verdicts.json`
(`pipeline.evaluation.results.Verdicts`) and `<out>/decision.json` (`pipeline.evaluation.results.Decision`:
which backbone per task and condition, by the rules of `pipeline.evaluation.decision`, under
`report.latency_budget_ms`), and logs them to the study's MLflow parent run. Each verdict is `holds`, `does
not hold` or `inconclusive`, with the rule that decided it written next to it, so a reader can check the call
against the numbers.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.evaluation import verdicts as rules
from pipeline.evaluation.decision import decision_table
from pipeline.evaluation.results import Results, Verdicts, read_results, to_json
from pipeline.outputs import atomic_output_dir, read_json
from pipeline.reporting.blocks import (
    TRAINING_FIGURE,
    bootstrap_settings,
    check_validation_records,
    decision_line,
    layout,
    render_html,
    render_markdown,
)
from pipeline.reporting.plateaus import plateau_figure, plateaus
from pipeline.tracking.stage_logs import log_report
from pipeline.tracking.store import check_reachable

# evidence name in results.json -> its claim's number (titles: pipeline.evaluation.verdicts.TITLES)
CLAIMS = {"serialisation": 1, "position_embedding": 2, "cost": 3, "rotation": 4}
RULES: dict[str, Callable[[Any], rules.Verdict]] = {
    "serialisation": rules.claim_serialisation,
    "position_embedding": rules.claim_position_embedding,
    "cost": rules.claim_cost,
    "rotation": rules.claim_rotation,
}


def verdicts(results: Results) -> list[rules.Verdict]:
    """Each claim's verdict from its typed evidence in results.json, by the rules of
    `pipeline.evaluation.verdicts`."""
    out = []
    for name, number in CLAIMS.items():
        evidence = getattr(results.evidence, name)
        if evidence is None:
            reason = "the evaluation holds no measurement for this claim"
            out.append(rules.no_evidence(number, rules.TITLES[number], reason))
        else:
            out.append(RULES[name](evidence))
    return out


def stage_times(timings_dir: Path) -> list[tuple[str, float]]:
    """(stage, wall seconds) of every stage the timings hold, and `evaluate: <part>` rows after evaluate."""
    rows = []
    for stage in ("prepare-points", "prepare-images", "prepare-proximity", "train", "evaluate", "report"):
        path = timings_dir / f"{stage}.json"
        if path.is_file():
            timing = json.loads(path.read_text())
            rows.append((stage, timing["wall_seconds"]))
            rows += [(f"{stage}: {part}", seconds) for part, seconds in timing.get("parts", {}).items()]
    return rows


def report(
    evaluation_dir: Path,
    train_dir: Path,
    timings_dir: Path,
    out: Path,
    wait_s: float = 120.0,
    latency_budget_ms: float = 20.0,
) -> list[rules.Verdict]:
    results = read_results(evaluation_dir / "results.json")
    study_path = train_dir / "study.json"
    train_summary = read_json(study_path, "train") if study_path.is_file() else {}
    check_validation_records(train_summary, study_path)
    mlflow = results.mlflow
    if mlflow.get("parent_run_id"):
        check_reachable(mlflow["tracking_uri"], f"the study's tracking store ({study_path})")
    verdict_list = verdicts(results)
    decision = decision_table(results, latency_budget_ms)
    plateau_rows = plateaus(train_summary, bootstrap_settings(results), results.models)
    timings = stage_times(timings_dir)
    with atomic_output_dir(out) as folder:
        # The report folder stands alone: the Markdown's figures are copied beside it, and the training
        # curves drawn there.
        (folder / "figures").mkdir()
        figures = {}
        for path in sorted((evaluation_dir / "figures").glob("*.png")):
            figures[path.name] = Path(shutil.copyfile(path, folder / "figures" / path.name))
        if plateau_rows:
            figures[TRAINING_FIGURE] = plateau_figure(plateau_rows, folder / "figures" / TRAINING_FIGURE)
        blocks = layout(results, verdict_list, train_summary, timings, figures, decision, plateau_rows)
        (folder / "report.md").write_text(render_markdown(blocks, folder))
        (folder / "report.html").write_text(render_html(blocks))
        (folder / "verdicts.json").write_text(to_json(Verdicts(claims=[v.as_dict() for v in verdict_list])))
        (folder / "decision.json").write_text(to_json(decision))
    for v in verdict_list:
        print(f"report: claim {v.claim} ({v.title}): {v.verdict}, effect {rules.render_effect(v)}")
    for row in decision.rows:
        print(f"report: {row.task}, {row.label}: {decision_line(row, latency_budget_ms)}")
    if mlflow.get("parent_run_id"):
        drawn = [out / "figures" / TRAINING_FIGURE] if TRAINING_FIGURE in figures else []
        url = log_report(mlflow, out, verdict_list, wait_s, drawn)
        served = (
            ""
            if mlflow["tracking_uri"].startswith("http")
            else (f" (serve the store first: mlflow server --backend-store-uri {mlflow['tracking_uri']})")
        )
        print(f"report: review in MLflow at {url}{served}")
    print(f"report: {out / 'report.md'}, {out / 'report.html'}")
    return verdict_list
