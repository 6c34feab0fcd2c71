"""The study's parent MLflow run: opened (or reopened on restore) before the trials, and finished after
them with every trial's best model and the trials table."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.config import StudyConfig
from pipeline.tracking import review
from pipeline.tracking.store import artifact_root, is_transient
from pipeline.training.inputs import TrainingInputs


def reopen_parent(client, run_id: str) -> str | None:
    """The interrupted run's parent MLflow run, running again; None if it is gone (deleted, or not in this
    store). A store that does not answer (`is_transient`: the server away, a dropped connection) is not a
    run that is gone: that error goes to the caller, which retries. Taken for gone, the rerun would log
    every trial under a new parent run and leave the interrupted one without what the outage kept from it."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if is_transient(err):
            raise
        return None
    if run.info.lifecycle_stage != "active":
        return None
    client.update_run(run_id, status="RUNNING")
    restores = int(run.data.tags.get("restores", "0")) + 1
    client.set_tag(run_id, "restores", str(restores))
    return run_id


def log_models(client, rows: list[dict]) -> None:
    """Every trial's best model into its nested run (`mlflow.pytorch.log_model`)."""
    import mlflow
    import mlflow.pytorch

    from perception.models import build
    from perception.models.registry import without_parametrizations

    mlflow.set_tracking_uri(client.tracking_uri)
    # MLflow warns on every pickled model; the study's own checkpoints are weights-only (data/train/models).
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    requirements = [f"torch=={torch.__version__.split('+')[0]}"]  # skip MLflow's slow requirement inference
    for row in rows:
        run_id = row["mlflow_run_id"]
        if not run_id or not row["checkpoint_path"]:
            continue
        if client.get_run(run_id).data.tags.get("model_logged"):
            continue  # logged by an earlier attempt of this step (a retry after an outage, a restored run)
        state = torch.load(row["checkpoint_path"], map_location="cpu", weights_only=True)
        model = build(state["family"], **state["model_config"])
        model.load_state_dict(state["model"])
        with mlflow.start_run(run_id=run_id):
            mlflow.pytorch.log_model(
                without_parametrizations(model),
                name="model",
                pip_requirements=requirements,
                serialization_format="pickle",
            )
            mlflow.log_metrics({"best_val_accuracy": row["val_accuracy"], "best_epoch": row["best_epoch"]})
            mlflow.set_tag("model_logged", "true")


def open_parent(
    client,
    config: StudyConfig,
    previous: dict[str, Any],
    uri: str,
    repo: Path,
    commit: str,
    inputs: TrainingInputs,
) -> str:
    """The study's parent run: the interrupted one again when restoring into the same store, else a new
    one with the commit, the datasets' hashes, sources and inputs, and every param."""
    from pipeline.tracking.trials import start_parent

    if previous.get("mlflow", {}).get("tracking_uri") == uri:
        parent_id = reopen_parent(client, previous["mlflow"]["parent_run_id"])
        if parent_id is not None:
            return parent_id
    tags = {
        "git_commit": commit,
        **{f"dataset.{kind}.sha256": digest for kind, digest in inputs.hashes.items()},
        **inputs.source_tags,
        "stage": "train",
        "mlflow.note.content": "Training. The verdicts appear here once the report stage has run.",
        **review.source_tags("train", commit),
    }
    artifacts = artifact_root(uri, repo)  # beside a SQLite store, wherever the stage runs from
    run_name = time.strftime("study %Y-%m-%d %H:%M:%S")
    parent_id = start_parent(client, config.mlflow.experiment, run_name, tags, config.flat(), artifacts)
    review.mark_experiment(client, client.get_run(parent_id).info.experiment_id)
    review.log_inputs(client, parent_id, [i for kind in inputs.mlflow_inputs.values() for i in kind])
    return parent_id


def finish_parent(
    client, parent_id: str, rows: list[dict], wall: float, table: Path, utilisation: float
) -> None:
    """Models and the table to MLflow, once the stage's outputs are safe on disk; the run FINISHED."""
    from mlflow.entities import Metric

    log_models(client, rows)
    # Per-model numbers live on each trial's run (best_val_accuracy), where the charts compare them.
    now = int(time.time() * 1000)
    metrics = [Metric("train_wall_seconds", wall, now, 0), Metric("slot_utilisation", utilisation, now, 0)]
    client.log_batch(parent_id, metrics=metrics)
    client.log_artifact(parent_id, str(table))
    client.set_terminated(parent_id, status="FINISHED")
