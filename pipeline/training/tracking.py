"""MLflow tracking: one parent run per study run, one nested run per trial, written by the driver alone.

Trials run in many processes (and machines); if each wrote to a SQLite store, concurrent writes would fail
with "database is locked". Here only the driver writes: a Tune callback receives every trial's results in
the driver process and logs them through one `MlflowClient`.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from ray.tune import Callback

from pipeline.training.space import resolved

# MLflow caps a batch at 100 params / 1000 metrics; stay under.
_BATCH = 100


def tracking_uri(param: str, repo: Path) -> str:
    """`mlflow.tracking_uri` from params, else MLFLOW_TRACKING_URI, else the repo's SQLite store."""
    if param:
        return param
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(repo / 'mlflow.db').resolve()}"


def git_commit(repo: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _params(flat: dict[str, Any]) -> list[Param]:
    return [Param(k, str(v)[:6000]) for k, v in flat.items()]


def log_params(client: MlflowClient, run_id: str, flat: dict[str, Any]) -> None:
    params = _params(flat)
    for i in range(0, len(params), _BATCH):
        client.log_batch(run_id, params=params[i : i + _BATCH])


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def start_parent(
    client: MlflowClient,
    experiment: str,
    run_name: str,
    tags: dict[str, str],
    flat: dict[str, Any],
    artifact_location: str | None = None,
) -> str:
    """The study's parent run, in `experiment` (created, with `artifact_location`, if it is new)."""
    found = client.get_experiment_by_name(experiment)
    experiment_id = (
        found.experiment_id
        if found
        else client.create_experiment(experiment, artifact_location=artifact_location)
    )
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    log_params(client, run.info.run_id, flat)
    return run.info.run_id


# Per-epoch metrics the trial reports that go to MLflow as curves.
CURVES = ("train_loss", "val_accuracy", "lr", "epoch_seconds", "retries")


class MlflowTrials(Callback):
    """Tune callback in the driver: a nested MLflow run per trial, its params, curves, retries, status."""

    def __init__(self, client: MlflowClient, parent_run_id: str):
        self.client = client
        self.parent_run_id = parent_run_id
        self.experiment_id = client.get_run(parent_run_id).info.experiment_id
        self.run_ids: dict[str, str] = {}  # trial id -> nested run id
        self.retries: dict[str, int] = {}

    def run_for(self, trial) -> str:
        if trial.trial_id not in self.run_ids:
            flat = resolved(trial.config)
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"{flat['trial.name']} ({trial.trial_id})",
                tags={
                    "mlflow.parentRunId": self.parent_run_id,
                    "trial_id": trial.trial_id,
                    "variant": flat["trial.name"],
                    "family": flat["trial.family"],
                },
            )
            self.run_ids[trial.trial_id] = run.info.run_id
            log_params(self.client, run.info.run_id, flat)
        return self.run_ids[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.run_for(trial)
        now = int(time.time() * 1000)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        metrics = [Metric(k, v, now, step) for k, v in numeric(result).items() if k in CURVES]
        tags = [
            RunTag("node_id", str(result.get("node_id", ""))),
            RunTag("device", str(result.get("device"))),
        ]
        self.client.log_batch(run_id, metrics=metrics, tags=tags)

    def on_trial_recover(self, iteration, trials, trial, **info):
        # The trial failed and Tune will retry it from its last checkpoint.
        run_id = self.run_for(trial)
        self.retries[trial.trial_id] = self.retries.get(trial.trial_id, 0) + 1
        self.client.set_tag(run_id, "retries", str(self.retries[trial.trial_id]))
        self.client.set_tag(run_id, f"failure_{self.retries[trial.trial_id]}", _error_line(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.run_for(trial)
        self.client.set_tag(run_id, "error", _error_line(trial))
        self.client.set_terminated(run_id, status="FAILED")

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.run_for(trial)
        self.client.set_tag(run_id, "retries", str(self.retries.get(trial.trial_id, 0)))
        self.client.set_terminated(run_id, status="FINISHED")


def _error_line(trial) -> str:
    """The last line of the trial's error, e.g. `InjectedFault: ... fails at epoch 2`."""
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "trial failed")[:500]
