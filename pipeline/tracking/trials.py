"""MLflow tracking: one parent run per study run, one nested run per trial, written by the driver alone.

Trials run in many processes (and machines); if each wrote to a SQLite store, concurrent writes would fail
with "database is locked". Here only the driver writes: a Tune callback receives every trial's results in
the driver process and logs them through one `MlflowClient`.
"""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from ray.tune import Callback

from pipeline.tracking.store import is_transient, short
from pipeline.training.space import resolved, trial_dataset, trial_label

# MLflow caps a batch at 100 params / 1000 metrics; stay under.
_BATCH = 100


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
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(experiment)
    if found:
        experiment_id = found.experiment_id
    else:
        try:
            experiment_id = client.create_experiment(experiment, artifact_location=artifact_location)
        except MlflowException:  # a study beside this one (a DVC queue) created it a moment ago
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise
            experiment_id = found.experiment_id
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    log_params(client, run.info.run_id, flat)
    return run.info.run_id


# Per-epoch metrics the trial reports that go to MLflow as curves; and the trial process's own system
# metrics (`system/...`, measured in the trial, not here), which MLflow's run page shows as system metrics.
CURVES = ("train_loss", "val_accuracy", "lr", "epoch_seconds", "retries")


def is_curve(key: str) -> bool:
    return key in CURVES or key.startswith("system/")


_METRIC_BATCH = 1000


class MlflowTrials(Callback):
    """Tune callback in the driver: a nested MLflow run per trial, its params, curves, retries, status.

    Live logging never stalls training: while the store is away, results are skipped (and tags kept) and
    `sync` writes what is missing from the Tune results on disk at the end. Every epoch is logged once,
    also when a restored or retried trial reports an epoch again.
    """

    def __init__(
        self,
        client: MlflowClient,
        parent_run_id: str,
        log: Callable[[str], None] = print,
        inputs: dict[str, list] | None = None,
        tags: dict[str, str] | None = None,
    ):
        self.client = client
        self.parent_run_id = parent_run_id
        self.log = log
        self.inputs = inputs or {}  # dataset ("points", "images", "proximity") -> its MLflow dataset inputs
        self.tags = tags or {}  # on every trial's run (e.g. the DVC experiment's name)
        self.experiment_id = client.get_run(parent_run_id).info.experiment_id
        self.run_ids: dict[str, str] = {}  # trial id -> nested run id
        self.last_step: dict[str, int] = {}  # nested run id -> highest epoch logged
        self.retries: dict[str, int] = {}
        self.pending_tags: dict[str, dict[str, str]] = {}  # trial id -> tags not written yet
        self.away_since: float | None = None  # when the store stopped answering, while it does not
        self.retry_at = 0.0
        self.backoff = 1.0
        self.skipped = 0  # live writes skipped while the store was away (`sync` makes up for them)

    # --- runs ---------------------------------------------------------------------------------------------

    def run_for(self, trial_id: str, trial_config: dict[str, Any]) -> str:
        if trial_id not in self.run_ids:
            flat = resolved(trial_config)
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"{trial_label(trial_config)} ({trial_id})",
                tags={
                    "mlflow.parentRunId": self.parent_run_id,
                    "trial_id": trial_id,
                    "variant": flat["trial.name"],
                    "family": flat["trial.family"],
                    "seed": str(flat["trial.seed"]),
                    **self.tags,
                },
            )
            self.run_ids[trial_id] = run.info.run_id
            log_params(self.client, run.info.run_id, flat)
            dataset = trial_dataset(flat)
            if self.inputs.get(dataset):
                self.client.log_inputs(run.info.run_id, datasets=self.inputs[dataset])
        return self.run_ids[trial_id]

    def adopt(self, finished: set[str]) -> int:
        """After a restore: the parent's nested runs become the trials' runs again (no duplicates); runs the
        stopped driver left RUNNING whose trial had not `finished` are tagged `interrupted`. Returns how
        many were."""
        interrupted = 0
        query = f"tags.mlflow.parentRunId = '{self.parent_run_id}'"
        page = None
        while True:
            runs = self.client.search_runs([self.experiment_id], query, max_results=500, page_token=page)
            for run in runs:
                run_id, trial_id = run.info.run_id, run.data.tags.get("trial_id", "")
                self.run_ids[trial_id] = run_id
                self.last_step[run_id] = max(self._logged_steps(run_id), default=0)
                if run.info.status == "RUNNING" and trial_id not in finished:
                    note = "the driver stopped mid-trial; resumed from its last checkpoint, if it had one"
                    self.client.set_tag(run_id, "interrupted", note)
                    interrupted += 1
            page = runs.token
            if not page:
                return interrupted

    def _logged_steps(self, run_id: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(run_id, "val_accuracy")}

    # --- live logging ---------------------------------------------------------------------------------------

    def _live(self, action: Callable[[], None]) -> None:
        """`action()` now, unless the store is away; a transient failure starts (or extends) an outage."""
        now = time.monotonic()
        if self.away_since is not None and now < self.retry_at:
            self.skipped += 1
            return
        try:
            action()
        except Exception as err:
            if not is_transient(err):
                raise
            if self.away_since is None:
                self.away_since = now
                self.log(
                    f"MLflow at {self.client.tracking_uri} unreachable ({short(err)}); training goes on and "
                    "the results are logged from disk when it answers again"
                )
            self.retry_at = now + self.backoff
            self.backoff = min(self.backoff * 2, 10.0)
            self.skipped += 1
            return
        if self.away_since is not None:
            self.log(
                f"MLflow at {self.client.tracking_uri} answers again after {now - self.away_since:.0f} s"
            )
            self.away_since, self.backoff = None, 1.0

    def _tag(self, trial, tags: dict[str, str]) -> None:
        self.pending_tags.setdefault(trial.trial_id, {}).update(tags)
        self._live(lambda: self._flush_tags(trial.trial_id, trial.config))

    def _flush_tags(self, trial_id: str, trial_config: dict[str, Any]) -> None:
        tags = self.pending_tags.get(trial_id)
        if tags:
            run_id = self.run_for(trial_id, trial_config)
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            del self.pending_tags[trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._live(lambda: self.run_for(trial.trial_id, trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step = int(result.get("epoch", result.get("training_iteration", 0)))

        def log() -> None:
            run_id = self.run_for(trial.trial_id, trial.config)
            if step <= self.last_step.get(run_id, 0):
                return  # a restored trial repeating an epoch that is already logged
            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, step) for k, v in numeric(result).items() if is_curve(k)]
            tags = [
                RunTag("node_id", str(result.get("node_id", ""))),
                RunTag("device", str(result.get("device"))),
            ]
            self.client.log_batch(run_id, metrics=metrics, tags=tags)
            self.last_step[run_id] = step

        self._live(log)

    def on_trial_recover(self, iteration, trials, trial, **info):
        # The trial failed and Tune will retry it from its last checkpoint.
        count = self.retries[trial.trial_id] = self.retries.get(trial.trial_id, 0) + 1
        self._tag(trial, {"retries": str(count), f"failure_{count}": _error_line(trial)})

    def on_trial_error(self, iteration, trials, trial, **info):
        self._tag(trial, {"error": _error_line(trial)})
        self._live(lambda: self.client.set_terminated(self.run_for(trial.trial_id, trial.config), "FAILED"))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._live(lambda: self.client.set_terminated(self.run_for(trial.trial_id, trial.config), "FINISHED"))

    # --- catching up ----------------------------------------------------------------------------------------

    def sync(self, results) -> None:
        """Make MLflow match the Tune results (`ray.tune.Result`s, read from disk): a run per trial, every
        reported epoch exactly once, pending tags, retries and the final status. Safe to call again."""
        for result in results:
            metrics = result.metrics or {}
            trial_id = metrics.get("trial_id") or Path(result.path).name
            run_id = self.run_for(trial_id, result.config)
            logged = self._logged_steps(run_id)
            history = result.metrics_dataframe
            missing: dict[int, Any] = {}
            if history is not None and "epoch" in history:
                for row in history.to_dict("records"):
                    if int(row["epoch"]) not in logged:
                        missing[int(row["epoch"])] = row  # an epoch reported twice: the last report wins
            batch = [
                Metric(k, v, int(row.get("timestamp", time.time()) * 1000), step)
                for step, row in sorted(missing.items())
                for k, v in numeric(row).items()
                if is_curve(k) and math.isfinite(v)
            ]
            for i in range(0, len(batch), _METRIC_BATCH):
                self.client.log_batch(run_id, metrics=batch[i : i + _METRIC_BATCH])
            tags = {
                **self.pending_tags.pop(trial_id, {}),
                "retries": str(int(metrics.get("retries", 0))),
                "node_id": str(metrics.get("node_id", "")),
                "device": str(metrics.get("device", "")),
            }
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            self.client.set_terminated(run_id, status="FAILED" if result.error else "FINISHED")


def _error_line(trial) -> str:
    """The last line of the trial's error, e.g. `InjectedFault: ... fails at epoch 2`."""
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "trial failed")[:500]
