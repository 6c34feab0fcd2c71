"""Stage `train`: one Ray Tune run over every variant of `train.models`, tracked in MLflow.

Outputs (`<out>/`, a DVC out, written whole or not at all):
- `models/<variant>/seed-<seed>.pt`: the best checkpoint (by validation accuracy) of every variant and
  training seed, with its flat config.
- `trials.csv`, `trials.json`: every trial with its config, metrics, node, duration and retries.
- `study.json`: the MLflow parent run, where trials were stored, the datasets' hashes, the best trial of
  each variant.
and `<metrics>` (a JSON file `dvc metrics show` reads): the best validation accuracy of every variant, mean
over seeds and per seed.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perception.data.arrays import open_dataset
from perception.training import stratified_split
from pipeline import review
from pipeline.config import ConfigError, StudyConfig, resolve_path
from pipeline.errors import TrainingError
from pipeline.mlflow_store import (
    TrackingUnavailable,
    check_reachable,
    retrying,
    tracking_uri,
    uri_source,
)
from pipeline.outputs import atomic_output_dir, write_json_atomic
from pipeline.training import space
from pipeline.training.trainable import CHECKPOINT_FILE, TrialData, run_trial

METRIC, MODE = "val_accuracy", "max"
log = logging.getLogger(__name__)


def _split_data(config: StudyConfig, inputs: np.ndarray, labels: np.ndarray) -> TrialData:
    train_idx, val_idx = stratified_split(labels, config.train.val_fraction, config.seed)
    return TrialData(
        np.ascontiguousarray(inputs[train_idx]),
        labels[train_idx],
        np.ascontiguousarray(inputs[val_idx]),
        labels[val_idx],
    )


def _storage(config: StudyConfig, repo: Path) -> str:
    """Trial storage: a URI as given, a path made absolute (trials run with their own working folders)."""
    storage = config.ray.storage
    if "://" in storage:
        return storage
    return str(resolve_path(storage or "data/ray_results", repo).resolve())


def _check_reachable(address: str) -> None:
    """Fail in seconds, naming the address, when no Ray head answers there (ray.init would wait minutes)."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=10):
            return
    except (OSError, ValueError):
        raise ConfigError(
            f"ray.address / RAY_ADDRESS = {address!r}: no Ray cluster answers there; start one with "
            "`ray start --head` and use the address it prints, or unset it to run Ray in-process"
        ) from None


def _loopback_only() -> None:
    """In-process Ray listens on 127.0.0.1 only. Ray does that where it runs no multi-node clusters,
    chosen by this variable when `ray` is imported; set here for this process and the ones it starts."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # ray was imported before (a test, a notebook): it read the flag then
        constants.ENABLE_RAY_CLUSTER = False


def _connect_ray(config: StudyConfig, repo: Path) -> bool:
    """Join the cluster at `ray.address` / RAY_ADDRESS, or start Ray in-process. True if started here."""
    import ray

    address = config.ray.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        _check_reachable(address)
    # Quiet: our LiveStatus replaces Tune's tables (legacy output at verbose=0 prints nothing).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune saves its run state this often (by default every 10 s or more): a driver killed just after a
    # trial finished then finds it finished on restore, and does not train it again.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    if address:
        # Ship this checkout's code to the cluster's workers; data goes through the object store.
        excludes = ["data/", ".dvc/", ".git/", ".venv/", "mlflow.db", "mlartifacts/", "*.egg-info/"]
        runtime_env = {"working_dir": str(repo), "excludes": excludes}
        ray.init(address=address, runtime_env=runtime_env, **quiet)
        return False
    _loopback_only()
    # "local": a new instance even where `ray start` left a cluster that ray.init would otherwise join.
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
    return True


# The experiment folder keeps this file beside Tune's own state: which study run it belongs to and whether
# it finished. A folder whose run did not finish is restored by the next run of the same params.
RUN_STATE = "study-run.json"


def _experiment_name(config: StudyConfig, dataset_hashes: dict[str, str]) -> str:
    """`train-<hash>` of what the trials depend on (the seed, `train.*`, the datasets): the same study
    finds its interrupted run again, a changed one starts its own."""
    flat = config.flat()
    relevant = {k: v for k, v in flat.items() if k in ("seed", "seeds") or k.startswith("train.")}
    payload = json.dumps({"params": relevant, "datasets": dataset_hashes}, sort_keys=True, default=str)
    return "train-" + hashlib.sha256(payload.encode()).hexdigest()[:12]


def _read_state(experiment: str) -> dict[str, Any]:
    try:
        if "://" in experiment:
            from pyarrow import fs

            filesystem, path = fs.FileSystem.from_uri(experiment)
            with filesystem.open_input_stream(f"{path}/{RUN_STATE}") as handle:
                return json.loads(handle.read())
        return json.loads((Path(experiment) / RUN_STATE).read_text())
    except (OSError, ValueError):
        return {}


def _write_state(experiment: str, state: dict[str, Any]) -> None:
    if "://" in experiment:
        from pyarrow import fs

        filesystem, path = fs.FileSystem.from_uri(experiment)
        filesystem.create_dir(path, recursive=True)
        with filesystem.open_output_stream(f"{path}/{RUN_STATE}") as handle:
            handle.write(json.dumps(state, indent=2, sort_keys=True).encode())
        return
    write_json_atomic(Path(experiment) / RUN_STATE, state)


def _check_trusted(experiment: Path) -> None:
    """Restoring unpickles Tune's state: only from a folder this user owns and nobody else can write."""
    for path in (experiment, experiment / "tuner.pkl"):
        info = path.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            raise ConfigError(
                f"{path}: not restoring a Tune run from a file or folder another user owns or can write "
                "(restoring unpickles it); remove the folder to train from scratch"
            )


def _clear_local_runs(storage: str, keep: str | None) -> None:
    """Remove local Tune runs but `keep` (the one being restored): a finished run of the same params is
    trained again, and old runs' checkpoints would pile up in data/ray_results."""
    for old in Path(storage).glob("train-*"):
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


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
    points = open_dataset(points_dir, "points")
    images = open_dataset(images_dir, "images") if "images" in datasets else None
    proximity = open_dataset(proximity_dir, "images") if "proximity" in datasets else None
    classes = points.manifest["classes"]
    in_channels = len(images.manifest["channels"]) if images else 4
    space.check(config, variants, len(classes), in_channels)
    address = config.ray.address or os.environ.get("RAY_ADDRESS", "")
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
    uri = tracking_uri(config.mlflow.tracking_uri, repo)
    check_reachable(uri, uri_source(config.mlflow.tracking_uri))

    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from ray import tune

    from pipeline.training.status import LiveStatus
    from pipeline.training.tracking import MlflowTrials, git_commit, start_parent

    point_data = image_data = None
    if "points" in datasets:
        labels = points.array("train_labels")
        point_data = _split_data(config, points.array("train_points"), labels)
    if images is not None:
        labels = images.array("train_labels")
        res = config.images.train_resolution
        image_data = _split_data(config, images.array(f"train_r{res}"), labels)
    proximity_data = None
    if proximity is not None:
        size = config.proximity.size
        proximity_data = _split_data(
            config, proximity.array(f"train_r{size}"), proximity.array("train_labels")
        )

    dataset_hashes = {
        "points": points.manifest_sha256,
        "images": images.manifest_sha256 if images else "",
        "proximity": proximity.manifest_sha256 if proximity else "",
    }
    # What the runs trained and were validated and tested on, as MLflow dataset inputs per dataset.
    dataset_inputs = {}
    for kind, folder, prepared, split, stem in (
        ("points", points_dir, points, point_data, "points"),
        ("images", images_dir, images, image_data, f"r{config.images.train_resolution}"),
        ("proximity", proximity_dir, proximity, proximity_data, f"r{config.proximity.size}"),
    ):
        if prepared is not None and split is not None:
            test = (prepared.array(f"test_{stem}", mmap=True), prepared.array("test_labels"))
            dataset_inputs[kind] = [
                review.dataset_input(
                    kind, context, x, y, Path(folder) / f"{file}_{stem}.npy", prepared.manifest_sha256
                )
                for context, file, (x, y) in (
                    ("train", "train", (split.train_inputs, split.train_labels)),
                    ("validation", "train", (split.val_inputs, split.val_labels)),
                    ("test", "test", test),
                )
            ]
    storage = _storage(config, repo)
    name = _experiment_name(config, dataset_hashes)
    experiment = f"{storage.rstrip('/')}/{name}"
    previous = _read_state(experiment)
    restoring = previous.get("status") == "running" and tune.Tuner.can_restore(experiment)
    if "://" not in storage:
        if restoring:
            _check_trusted(Path(experiment))
        _clear_local_runs(storage, keep=name if restoring else None)

    # Ray first: an unreachable cluster fails before an MLflow run is opened for nothing.
    started_here = _connect_ray(config, repo)
    began = time.monotonic()
    client = MlflowClient(tracking_uri=uri)
    commit = git_commit(repo)
    source = review.source_tags("train", commit)  # the parent's and every trial's Source column
    wait_s = config.mlflow.wait_seconds
    parent_id = None
    try:
        import ray

        cluster_cpus = ray.cluster_resources().get("CPU", 0)
        if cluster_cpus < config.train.cpus_per_trial:
            raise ConfigError(
                f"train.cpus_per_trial = {config.train.cpus_per_trial:g} is not allowed: the Ray cluster has "
                f"{cluster_cpus:g} CPUs"
            )
        study_flat = config.flat()
        if restoring and previous.get("mlflow", {}).get("tracking_uri") == uri:
            parent_id = _reopen_parent(client, previous["mlflow"]["parent_run_id"])
        if parent_id is None:
            tags = {
                "git_commit": commit,
                "dataset.points.sha256": dataset_hashes["points"],
                "dataset.images.sha256": dataset_hashes["images"],
                "dataset.proximity.sha256": dataset_hashes["proximity"],
                "stage": "train",
                "mlflow.note.content": "Training. The verdicts appear here once the report stage has run.",
                **source,
            }
            # With a SQLite store, artifacts go beside it wherever the stage runs from.
            artifacts = (repo / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
            run_name = time.strftime("study %Y-%m-%d %H:%M:%S")
            parent_id = start_parent(client, config.mlflow.experiment, run_name, tags, study_flat, artifacts)
            review.mark_experiment(client, client.get_run(parent_id).info.experiment_id)
            review.log_inputs(client, parent_id, [i for inputs in dataset_inputs.values() for i in inputs])
        state = {"status": "running", "mlflow": {"tracking_uri": uri, "parent_run_id": parent_id}}
        _write_state(experiment, state)

        use_asha = _use_asha(config, variants)
        total_trials = len(variants) * len(config.seeds) * config.train.num_samples
        resources = {"cpu": config.train.cpus_per_trial, "gpu": config.train.gpus_per_trial}
        # What trials see: the study's knobs (variants come in as `trial.*`) and the data's facts.
        trial_flat = {k: v for k, v in study_flat.items() if not k.startswith("train.models.")}
        trial_flat.update({"data.num_classes": len(classes), "data.in_channels": in_channels})
        mlflow_callback = MlflowTrials(client, parent_id, inputs=dataset_inputs, tags=source)
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, images=image_data, points=point_data, proximity=proximity_data),
            resources,
        )
        done_before = 0
        if restoring:
            # resume_errored: trials that failed for good last time get their retries again.
            tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
            finished = {
                r.metrics["trial_id"]
                for r in tuner.get_results()
                if (r.metrics or {}).get("epoch") == space.trial_epochs(config, r.config)
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
            param_space = space.param_space(config, variants, trial_flat)
            tuner = _new_tuner(config, trainable, param_space, name, storage, use_asha)
        # A restored Tuner brings back the callbacks pickled with the run; this driver's own go in instead.
        tuner._local_tuner.get_run_config().callbacks = [
            mlflow_callback,
            LiveStatus(total_trials, METRIC, done_before=done_before),
        ]
        print(
            f"train: {total_trials} trials ({len(variants)} variants x {len(config.seeds)} seeds x "
            f"{config.train.num_samples} samples), "
            f"{_epochs_text(config, variants)}, {resources['cpu']:g} CPU + {resources['gpu']:g} GPU per trial"
            f"{', ASHA' if use_asha else ''}; MLflow {uri}, run {parent_id}; Tune run {experiment}",
            flush=True,
        )
        grid = tuner.fit()
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
    results = list(grid)
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
    rows = _trial_rows(results, mlflow_callback)
    failed = [r for r in rows if r["status"] == "ERROR"]
    if failed:
        client.set_terminated(parent_id, status="FAILED")
        # The failed trials' table, one line each, before the stage's own one-line error.
        print("train: failed trials (variant, seed, reason):")
        for row in failed:
            print(f"  {row['variant']}  seed {row['seed']}  {row['error']}")
        first = failed[0]
        raise TrainingError(
            f"{len(failed)} trial(s) failed after {config.train.max_failures} retries, e.g. "
            f"{first['variant']} ({first['trial_id']}): {first['error']}; see MLflow run {parent_id}"
        )

    best = _best_per_variant(rows, variants, config.seeds)
    summary = {
        "mlflow": {"tracking_uri": uri, "experiment": config.mlflow.experiment, "parent_run_id": parent_id},
        "storage": storage,
        "tune_run": experiment,
        "datasets": dataset_hashes,
        "wall_seconds": round(wall, 1),
        "seeds": list(config.seeds),
        "variants": {
            variant.name: {
                str(seed): {
                    k: best[variant.name, seed][k]
                    for k in (
                        "trial_id",
                        "family",
                        "val_accuracy",
                        "best_epoch",
                        "checkpoint_file",
                        "mlflow_run_id",
                    )
                }
                for seed in config.seeds
            }
            for variant in variants
        },
    }
    # Results only: how often trials were retried or resumed is in the trials table and MLflow.
    metrics = {
        "val_accuracy": {
            variant.name: round(
                float(np.mean([best[variant.name, s]["val_accuracy"] for s in config.seeds])), 6
            )
            for variant in variants
        },
        "val_accuracy_by_seed": {
            variant.name: {str(s): round(best[variant.name, s]["val_accuracy"], 6) for s in config.seeds}
            for variant in variants
        },
        "trials": len(rows),
        # Not a measurement: where this run's numbers are in MLflow, so that `dvc exp show` lists it.
        "mlflow_parent_run_id": parent_id,
    }

    with atomic_output_dir(out) as folder:
        for row in best.values():
            target = folder / row["checkpoint_file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            _export_checkpoint(Path(row["checkpoint_path"]), target, row)
        _write_table(rows, folder)
        (folder / "study.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    write_json_atomic(metrics_out, metrics)

    # Models and the table go to MLflow once the outputs are safe on disk.
    def log_study() -> None:
        _log_models(client, rows)
        # Per-model numbers live on each trial's run (best_val_accuracy), where the charts compare them.
        client.log_batch(parent_id, metrics=[Metric("train_wall_seconds", wall, int(time.time() * 1000), 0)])
        client.log_artifact(parent_id, str(out / "trials.csv"))
        client.set_terminated(parent_id, status="FINISHED")

    try:
        retrying(log_study, "logging the models", uri, wait_s, print)
    except TrackingUnavailable as err:
        raise TrainingError(
            f"{err}; the outputs are in {out} and the trials in {experiment}: run the stage again once the "
            "server answers"
        ) from None
    _write_state(experiment, {**state, "status": "finished"})
    print(f"train: {len(rows)} trials in {wall:.0f} s; best of every variant in {out / 'models'}")
    for name, value in metrics["val_accuracy"].items():
        by_seed = ", ".join(f"{v:.3f}" for v in metrics["val_accuracy_by_seed"][name].values())
        print(f"  {name:24s} val_accuracy {value:.3f} (mean over seeds: {by_seed})")
    return summary


def _use_asha(config: StudyConfig, variants: list[space.Variant]) -> bool:
    scheduler = config.train.scheduler
    return scheduler == "asha" or (scheduler == "auto" and space.is_search(config, variants))


def _epochs_text(config: StudyConfig, variants: list[space.Variant]) -> str:
    """`8 epochs` or `8 epochs (vit 20)`: the study's epochs and the variants that set their own."""
    own = [
        f"{v.name} {v.fixed['epochs']}"
        for v in variants
        if v.fixed.get("epochs", config.train.epochs) != config.train.epochs
    ]
    return f"{config.train.epochs} epochs" + (f" ({', '.join(own)})" if own else "")


def _new_tuner(config: StudyConfig, trainable, param_space: dict, name: str, storage: str, use_asha: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    max_epochs = space.max_epochs(config, space.expand(config))
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            num_samples=config.train.num_samples,
            max_concurrent_trials=config.train.max_concurrent_trials or None,
            search_alg=BasicVariantGenerator(random_state=config.seed),
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
            scheduler=ASHAScheduler(
                time_attr="training_iteration",
                max_t=max_epochs,
                grace_period=min(config.train.grace_period, max_epochs),
            )
            if use_asha
            else None,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=config.train.max_failures),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE
            ),
            verbose=0,
        ),
    )


def _trial_name(trial) -> str:
    """`<variant>-s<seed>_<trial id>`: the variant and training seed in Tune's name and folder."""
    return f"{space.trial_label(trial.config)}_{trial.trial_id}"


def _reopen_parent(client, run_id: str) -> str | None:
    """The interrupted run's parent MLflow run, running again; None if it is gone."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    if run.info.lifecycle_stage != "active":
        return None
    client.update_run(run_id, status="RUNNING")
    restores = int(run.data.tags.get("restores", "0")) + 1
    client.set_tag(run_id, "restores", str(restores))
    return run_id


# ---------------------------------------------------------------------------------------------------------


def _trial_rows(results, mlflow_callback) -> list[dict[str, Any]]:
    """One row per trial from the real run: config, metrics, node, duration, retries, best checkpoint."""
    rows = []
    for result in results:
        config = result.config
        trial = config["trial"]
        history = result.metrics_dataframe
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        best_ckpt = result.get_best_checkpoint(METRIC, MODE) if result.checkpoint else None
        best_epoch, best_acc = 0, float("nan")
        if history is not None and len(history) and METRIC in history:
            top = history.loc[history[METRIC].idxmax()]
            best_epoch, best_acc = int(top["epoch"]), float(top[METRIC])
        status = "ERROR" if result.error else "TERMINATED"
        rows.append(
            {
                "trial_id": trial_id,
                "variant": trial["name"],
                "model": trial["model"],
                "family": trial["family"],
                "status": status,
                "epochs": int(metrics.get("epoch", 0)),
                "val_accuracy": best_acc,
                "best_epoch": best_epoch,
                "final_val_accuracy": float(metrics.get(METRIC, float("nan"))),
                "final_train_loss": float(metrics.get("train_loss", float("nan"))),
                "node_id": metrics.get("node_id", ""),
                "hostname": metrics.get("hostname", ""),
                "device": metrics.get("device", ""),
                "duration_s": round(float(metrics.get("time_total_s", 0.0)), 2),
                "retries": int(metrics.get("retries", 0)),
                "seed": config["trial_seed"],
                "settings": {k: v for k, v in trial.items() if k not in ("name", "model", "family")},
                "mlflow_run_id": mlflow_callback.run_ids.get(trial_id, ""),
                "error": str(result.error).strip().splitlines()[-1][:300] if result.error else "",
                "checkpoint_path": str(Path(best_ckpt.path) / CHECKPOINT_FILE) if best_ckpt else "",
                "checkpoint_file": f"models/{trial['name']}/seed-{config['trial_seed']}.pt",
            }
        )
    rows.sort(key=lambda r: (r["variant"], r["seed"], r["trial_id"]))
    return rows


def _best_per_variant(rows: list[dict], variants: list[space.Variant], seeds: tuple[int, ...]) -> dict:
    """(variant, seed) -> the row of its best trial (by validation accuracy, over `num_samples` draws)."""
    best: dict[tuple[str, int], dict] = {}
    for variant in variants:
        for seed in seeds:
            candidates = [
                r for r in rows if r["variant"] == variant.name and r["seed"] == seed and r["checkpoint_path"]
            ]
            if not candidates:
                raise TrainingError(f"variant {variant.name}, seed {seed}: no trial left a checkpoint")
            best[variant.name, seed] = max(
                candidates, key=lambda r: -math.inf if math.isnan(r["val_accuracy"]) else r["val_accuracy"]
            )
    return best


def _export_checkpoint(source: Path, target: Path, row: dict) -> None:
    """The model part of a trial checkpoint (no optimiser state), with its flat config and metrics."""
    state = torch.load(source, map_location="cpu", weights_only=True)
    torch.save(
        {
            "state_dict": state["model"],
            "config": state["config"],
            "epoch": state["epoch"] + 1,
            "metrics": state["metrics"],
            "trial_id": row["trial_id"],
        },
        target,
    )


TABLE_COLUMNS = (
    "trial_id", "variant", "family", "status", "epochs", "val_accuracy", "best_epoch", "final_val_accuracy",
    "final_train_loss", "node_id", "hostname", "device", "duration_s", "retries", "seed", "settings",
    "mlflow_run_id", "error",
)  # fmt: skip


def _write_table(rows: list[dict], folder: Path) -> None:
    with open(folder / "trials.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=TABLE_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "settings": json.dumps(row["settings"], sort_keys=True)})
    public = [{k: row[k] for k in TABLE_COLUMNS} for row in rows]
    (folder / "trials.json").write_text(json.dumps(public, indent=2, sort_keys=True, default=str) + "\n")


def _log_models(client, rows: list[dict]) -> None:
    """Every trial's best model into its nested run (`mlflow.pytorch.log_model`)."""
    import mlflow
    import mlflow.pytorch

    from perception.models.registry import without_parametrizations
    from pipeline.training.trainable import build_model

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
        model = build_model(state["config"])
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
