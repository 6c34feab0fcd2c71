"""Stage `train`: one Ray Tune run over every variant of `train.models`, tracked in MLflow.

Outputs (`<out>/`, a DVC out, written whole or not at all):
- `models/<variant>/seed-<seed>.pt`: the best checkpoint (by validation accuracy) of every variant and
  training seed, in `perception.models.checkpoint`'s format.
- `trials.csv`, `trials.json`: every trial with its config, metrics, node, duration and retries.
- `study.json`: the MLflow parent run, where trials were stored, the datasets' hashes, the best trial of
  each variant.
and `<metrics>` (a JSON file `dvc metrics show` reads): the best validation accuracy of every variant, mean
over seeds and per seed.

The Ray side (session, restore, Tuner) is `pipeline.training.session`, the results table
`pipeline.training.table`, the parent MLflow run `pipeline.tracking.parent_run`.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ConfigError, StudyConfig
from pipeline.errors import TrainingError
from pipeline.outputs import atomic_output_dir, write_json_atomic
from pipeline.parallel import slots_folder
from pipeline.tracking import review, store
from pipeline.tracking.store import TrackingUnavailable, check_reachable, retrying, tracking_uri, uri_source
from pipeline.training import session, space, table
from pipeline.training.inputs import TrainingInputs, open_inputs, training_inputs
from pipeline.training.trainable import run_trial


def check_resources(config: StudyConfig, address: str) -> None:
    """GPUs and CPUs per trial that this machine can give (a cluster's are checked once joined)."""
    if config.train.gpus_per_trial > 0 and not torch.cuda.is_available() and not address:
        raise ConfigError(
            f"train.gpus_per_trial = {config.train.gpus_per_trial} is not allowed here: this machine has no "
            "CUDA device; use 0, or run on a cluster with GPU workers (ray.address / RAY_ADDRESS)"
        )
    machine_cpus = os.cpu_count() or 1
    if not address and config.train.cpus_per_trial > machine_cpus:
        raise ConfigError(
            f"train.cpus_per_trial = {config.train.cpus_per_trial:g} is not allowed here: expected at most "
            f"{machine_cpus}, the CPUs of this machine; use fewer, or run on a cluster "
            "(ray.address / RAY_ADDRESS)"
        )


def check_variants(config: StudyConfig) -> list[str]:
    """`python -m pipeline check-params`'s list of the variants this stage runs, each checked as `train`
    checks it, before any data exist (`space.check_before_data`)."""
    variants = space.check_before_data(config)
    seeds = list(config.seeds)
    lines = [f"variants: {len(variants)}, each trained on seeds {seeds}: {len(variants) * len(seeds)} trials"]
    for variant in variants:
        epochs = space.variant_epochs(config, variant)
        lines.append(f"  {variant.name}: {variant.family} on {variant.dataset}, {epochs} epochs")
    return lines


def train(
    config: StudyConfig,
    points_dir: Path,
    images_dir: Path,
    proximity_dir: Path,
    out: Path,
    metrics_out: Path,
    repo: Path,
) -> dict[str, Any]:
    # Everything that can be wrong with params, inputs or the tracking store is found before Ray starts.
    variants = space.expand(config)
    datasets = {v.dataset for v in variants}
    folders = {"points": points_dir, "images": images_dir, "proximity": proximity_dir}
    prepared, num_classes, in_channels = open_inputs(config, datasets, folders)
    space.check(config, variants, num_classes, in_channels)
    address = config.ray.address or os.environ.get("RAY_ADDRESS", "")
    check_resources(config, address)
    uri = tracking_uri(config.mlflow.tracking_uri, repo)
    check_reachable(uri, uri_source(config.mlflow.tracking_uri))

    inputs = training_inputs(config, datasets, folders, prepared, review.dataset_input)
    storage = session.storage_path(config, repo)
    name = session.experiment_name(config, inputs.hashes)
    experiment = f"{storage.rstrip('/')}/{name}"
    with session.holding(experiment):
        return _fit_and_export(
            config, variants, inputs, (num_classes, in_channels), uri, experiment, out, metrics_out, repo
        )


def _fit_and_export(
    config: StudyConfig,
    variants: list[space.Variant],
    inputs: TrainingInputs,
    data_facts: tuple[int, int],
    uri: str,
    experiment: str,
    out: Path,
    metrics_out: Path,
    repo: Path,
) -> dict[str, Any]:
    """The Tune run in `experiment` (restored if it was cut short), held by this driver; then its results
    to MLflow, the checkpoints and tables to `out` and the metrics to `metrics_out`."""
    from ray import tune

    from pipeline.tracking.parent_run import finish_parent, open_parent
    from pipeline.tracking.trials import MlflowTrials, git_commit
    from pipeline.training.status import LiveStatus

    storage, name = experiment.rsplit("/", 1)
    num_classes, in_channels = data_facts
    previous = session.read_state(experiment)
    restoring = previous.get("status") == "running" and tune.Tuner.can_restore(experiment)
    if "://" not in storage:
        if restoring:
            session.check_trusted(Path(experiment))
        session.clear_local_runs(storage, keep=name if restoring else None)

    # Ray first: an unreachable cluster fails before an MLflow run is opened for nothing.
    started_here = session.connect_ray(config, repo)
    began = time.monotonic()
    client = store.client(uri)
    commit = git_commit(repo)
    wait_s = config.mlflow.wait_seconds
    parent_id = None
    try:
        session.check_cluster_cpus(config)
        # Retried like every other MLflow step here: the first request after Ray's start can meet the server
        # closing the idle connection (a keep-alive timeout), and a restore must find its parent run again.
        parent_id = retrying(
            lambda: open_parent(client, config, previous if restoring else {}, uri, repo, commit, inputs),
            "opening the study's run",
            uri,
            wait_s,
            print,
        )
        state = {"status": "running", "mlflow": {"tracking_uri": uri, "parent_run_id": parent_id}}
        session.write_state(experiment, state)

        total_trials = len(variants) * len(config.seeds) * config.train.num_samples
        resources = {"cpu": config.train.cpus_per_trial, "gpu": config.train.gpus_per_trial}
        source = review.source_tags("train", commit)  # the Source column of every trial's run
        mlflow_callback = MlflowTrials(client, parent_id, inputs=inputs.mlflow_inputs, tags=source)
        # In-process, every trial holds its cores among the studies on this machine (a DVC queue's -j N).
        cpu_slots = str(slots_folder()) if started_here else None
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, **inputs.data, cpu_slots_folder=cpu_slots), resources
        )
        done_before = 0
        if restoring:
            # resume_errored: trials that failed for good last time get their retries again.
            tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
            finished = {
                metrics["trial_id"]
                for r in table.results_of(tuner.get_results())
                if (metrics := r.metrics or {}).get("epoch") == space.trial_epochs(config, r.config)
            }
            done_before = len(finished)
            interrupted = retrying(
                lambda: mlflow_callback.adopt(finished), "reopening the trials' runs", uri, wait_s, print
            )
            print(
                f"train: restoring the interrupted run {experiment}: {done_before}/{total_trials} trials "
                f"had finished and are kept, {interrupted} cut short resume from their last checkpoint",
                flush=True,
            )
        else:
            # What trials see: the study's knobs (variants come in as `trial.*`) and the data's facts.
            trial_flat = {k: v for k, v in config.flat().items() if not k.startswith("train.models.")}
            trial_flat.update({"data.num_classes": num_classes, "data.in_channels": in_channels})
            param_space = space.param_space(config, variants, trial_flat)
            tuner = session.new_tuner(
                config, trainable, param_space, name, storage, reuse_actors=started_here
            )
        # A restored Tuner brings back the callbacks pickled with the run; this driver's own go in instead.
        local_tuner = tuner._local_tuner
        if local_tuner is None:
            raise TrainingError("Ray Tune gave a Tuner without its local run: restore it on the driver")
        local_tuner.get_run_config().callbacks = [
            mlflow_callback,
            LiveStatus(total_trials, session.METRIC, done_before=done_before),
        ]
        print(
            f"train: {total_trials} trials ({len(variants)} variants x {len(config.seeds)} seeds x "
            f"{config.train.num_samples} samples), "
            f"{session.epochs_text(config, variants)}, {resources['cpu']:g} CPU + {resources['gpu']:g} GPU "
            f"per trial{', ASHA' if session.use_asha(config, variants) else ''}; MLflow {uri}, run "
            f"{parent_id}; Tune run {experiment}",
            flush=True,
        )
        slots = session.concurrent_slots(config, total_trials - done_before)
        fit_began, fit_clock = time.time(), time.monotonic()
        grid = tuner.fit()
        fit_wall = time.monotonic() - fit_clock
    except BaseException:
        if parent_id is not None:
            with contextlib.suppress(Exception):
                client.set_terminated(parent_id, status="FAILED")
        raise
    finally:
        if started_here:
            import ray

            ray.shutdown()
    wall = time.monotonic() - began

    # MLflow gets whatever live logging missed (an outage, a restore) from the results on disk.
    results = table.results_of(grid)
    try:
        retrying(lambda: mlflow_callback.sync(results), "logging the trials", uri, wait_s, print)
    except TrackingUnavailable as err:
        raise TrainingError(
            f"{err}; every trial's results are kept in {experiment}: run the stage again once the server "
            "answers and it logs them without training again"
        ) from None
    if mlflow_callback.skipped:
        print(
            f"train: {mlflow_callback.skipped} live MLflow writes missed during an outage, logged from disk"
        )
    rows = table.trial_rows(results, mlflow_callback)
    utilisation = session.slot_utilisation(table.busy_seconds(results, since=fit_began), fit_wall, slots)
    print(
        f"train: slot utilisation {utilisation:.0%} (the trials' own time over {fit_wall:.0f} s x {slots} "
        "concurrent slots)",
        flush=True,
    )
    failed = [r for r in rows if r["status"] == "ERROR"]
    if failed:
        client.set_terminated(parent_id, status="FAILED")
        raise table.failed_trials_error(failed, config.train.max_failures, parent_id)

    best = table.best_per_variant(rows, variants, config.seeds)
    summary = table.study_summary(
        best,
        variants,
        config.seeds,
        mlflow={"tracking_uri": uri, "experiment": config.mlflow.experiment, "parent_run_id": parent_id},
        storage=storage,
        tune_run=experiment,
        datasets=inputs.hashes,
        wall_seconds=round(wall, 1),
        slot_utilisation=round(utilisation, 4),
    )
    metrics = table.study_metrics(best, variants, config.seeds, len(rows))
    metrics["slot_utilisation"] = round(utilisation, 4)  # timing: how well the run kept its slots busy
    # Not a measurement: where this run's numbers are in MLflow, so that `dvc exp show` lists it.
    metrics["mlflow_parent_run_id"] = parent_id
    with atomic_output_dir(out) as folder:
        for row in best.values():
            target = folder / row["checkpoint_file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            table.export_checkpoint(Path(row["checkpoint_path"]), target, row)
        table.write_table(rows, folder)
        write_json_atomic(folder / "study.json", summary)
    write_json_atomic(metrics_out, metrics)

    try:
        retrying(
            lambda: finish_parent(client, parent_id, rows, wall, out / "trials.csv", utilisation),
            "logging the models",
            uri,
            wait_s,
            print,
        )
    except TrackingUnavailable as err:
        raise TrainingError(
            f"{err}; the outputs are in {out} and the trials in {experiment}: run the stage again once the "
            "server answers"
        ) from None
    session.write_state(experiment, {**state, "status": "finished"})
    print(f"train: {len(rows)} trials in {wall:.0f} s; best of every variant in {out / 'models'}")
    for name, value in metrics["val_accuracy"].items():
        by_seed = ", ".join(f"{v:.3f}" for v in metrics["val_accuracy_by_seed"][name].values())
        print(f"  {name:24s} val_accuracy {value:.3f} (mean over seeds: {by_seed})")
    return summary
