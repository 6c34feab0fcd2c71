"""How the study reads in MLflow's UI, where a team reviews it.

- The experiment is marked as model development (`mlflow.experimentKind`) and carries a description
  (`mlflow.note.content`): the verdicts and how to read them. MLflow 3.17's UI decides its landing page by
  the `workflowType` it keeps per browser (GenAI unless switched), so `review_url` adds
  `?workflowType=machine_learning`: that link opens the runs table.
- The prepared datasets are the runs' inputs (`mlflow.data`, contexts train / validation / test), so the
  runs table's Dataset column names them, with the manifest's hash as digest.
- Each trained (variant, seed) gets its test numbers on its own trial run under names that are the same
  for every model (`test_accuracy_so3`, `test_accuracy_so3_lo`, ...): the chart view then draws one chart per
  quantity with one bar per model. Runs carry a `variant` tag, which the runs table's "Group by" offers,
  to pool seeds.
- The cost sweep is one run per model with latency and memory per token count as steps: one line per model.

Only the driver (a stage's own process) writes through these, as everywhere in the pipeline.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

EXPERIMENT_KIND = "custom_model_development"
DIGEST_CHARS = 32  # MLflow stores a dataset digest in 36 characters; the manifest's sha256 is cut to fit


def review_url(tracking_uri: str, experiment_id: str) -> str:
    """The link that opens the study's runs table (with a SQLite store: once `mlflow server` serves it)."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def source_tags(stage: str, commit: str) -> dict[str, str]:
    """What the runs table's Source column shows (the DVC command and stage, the git commit), and the DVC
    experiment the run belongs to: `dvc exp run` sets DVC_EXP_NAME for the stage commands."""
    experiment = os.environ.get("DVC_EXP_NAME", "")
    within = f" (dvc exp run -n {experiment})" if experiment else ""
    tags = {
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": f"python -m pipeline {stage}{within}",
        "mlflow.source.git.commit": commit,
    }
    return {**tags, "dvc.exp_name": experiment} if experiment else tags


def mark_experiment(client, experiment_id: str, description: str | None = None) -> None:
    """Model development, not GenAI; and the experiment's description when there is one."""
    client.set_experiment_tag(experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND)
    if description is not None:
        client.set_experiment_tag(experiment_id, "mlflow.note.content", description)


# --- datasets ----------------------------------------------------------------------------------------------


def dataset_input(
    kind: str, context: str, features: np.ndarray, targets: np.ndarray, source: Path, manifest_sha256: str
):
    """One prepared split as an MLflow dataset input: name `<kind>-<context>`, the file it comes from, the
    manifest's hash as digest; schema and counts come from the arrays."""
    from mlflow.data.numpy_dataset import from_numpy
    from mlflow.entities import DatasetInput, InputTag

    with warnings.catch_warnings():
        # A local path matches two registered source kinds, both local files; MLflow warns and picks one.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        dataset = from_numpy(
            features,
            source=str(source),
            targets=targets,
            name=f"{kind}-{context}",
            digest=manifest_sha256[:DIGEST_CHARS],
        )
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])


def log_inputs(client, run_id: str, inputs: list) -> None:
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


# --- per-model test metrics --------------------------------------------------------------------------------


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if np.isfinite(v)]
    for i in range(0, len(batch), 500):
        client.log_batch(run_id, metrics=batch[i : i + 500])


def child_run(client, parent_id: str, name: str, tags: dict[str, str], inputs: list | None = None) -> str:
    """The parent's nested run named `name` (found again on a rerun of the stage, else created)."""
    experiment_id = client.get_run(parent_id).info.experiment_id
    query = f"tags.mlflow.parentRunId = '{parent_id}' and tags.mlflow.runName = '{name}'"
    found = client.search_runs([experiment_id], query, max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=name, tags={"mlflow.parentRunId": parent_id, **tags})
    log_inputs(client, run.info.run_id, inputs or [])
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def log_cost_sweep(
    client, parent_id: str, rows: list[dict[str, Any]], tags: dict[str, str] | None = None
) -> None:
    """One nested run per cost model, latency and peak memory at step = tokens, as `sweep_<key>`: the
    trained models' own `latency_ms` and `peak_memory_mb` (their deployment cost, one value per trial run)
    keep the plain names, so MLflow's chart view draws those as one bar per run."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    for model in dict.fromkeys(r["model"] for r in rows):
        run_tags = {"kind": "cost", "variant": f"cost {model}", **(tags or {})}
        run_id = child_run(client, parent_id, f"cost {model}", run_tags)
        batch = [
            Metric(f"sweep_{key}", float(row[key]), now, int(row["tokens"]))
            for row in rows
            if row["model"] == model
            for key in ("latency_ms", "latency_ms_lo", "latency_ms_hi", "peak_memory_mb")
            if row.get(key) is not None and np.isfinite(row[key])
        ]
        client.log_batch(run_id, metrics=batch)


def log_figures(client, run_id: str, figures: list[Path], folder: str = "evaluation/figures") -> None:
    """Figures as MLflow images (the run's image grid), and the PNG files as artifacts in `folder`."""
    from PIL import Image

    for figure in figures:
        with Image.open(figure) as image:
            client.log_image(run_id, image.convert("RGB"), key=figure.stem, step=0)
        client.log_artifact(run_id, str(figure), folder)


# --- the experiment's description --------------------------------------------------------------------------


def study_description(verdict_lines: list[str], url: str) -> str:
    """Markdown for the experiment and the parent run: the verdicts, then where to look."""
    return "\n".join(
        [
            "# Which vision backbone: the study's verdicts",
            "",
            *[f"- {line}" for line in verdict_lines],
            "",
            "## How to read it",
            "",
            "- **Runs table**: the parent run `study ...` holds the claim-level numbers (`claim_<n>_effect`, "
            "`_lo`, `_hi`) and the report (Artifacts → `report/report.html`). Expand it for one run per "
            "(variant, seed); the Dataset column names their inputs.",
            "- **Chart view**: one chart per test metric (`test_accuracy`, `test_accuracy_so3`, "
            "`test_accuracy_fov_<R>`, ...) with a bar per model; *Group by* the tag `variant` to pool the "
            "seeds. The `cost <model>` runs draw `latency_ms` and `peak_memory_mb` against tokens (step).",
            "- Every number that decides a verdict carries a 95% interval over seeds and test samples.",
            f"- This view: {url}",
        ]
    )
