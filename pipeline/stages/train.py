"""Stage `train`: one Ray Tune run over every variant of `train.models`, tracked in MLflow.

Outputs (`<out>/`, a DVC out, written whole or not at all):
- `models/<variant>.pt`: the best checkpoint (by validation accuracy) of every variant, with its flat config.
- `trials.csv`, `trials.json`: every trial with its config, metrics, node, duration and retries.
- `study.json`: the MLflow parent run, where trials were stored, the datasets' hashes, the best trial of
  each variant.
and `<metrics>` (a JSON file `dvc metrics show` reads): the best validation accuracy of every variant.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perception.data.arrays import open_dataset
from perception.training import stratified_split
from pipeline.config import ConfigError, StudyConfig, resolve_path
from pipeline.outputs import atomic_output_dir, write_json_atomic
from pipeline.training import space
from pipeline.training.trainable import CHECKPOINT_FILE, TrialData, run_trial

METRIC, MODE = "val_accuracy", "max"
log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The Tune run did not produce a trained model for every variant."""


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


def _connect_ray(config: StudyConfig, repo: Path) -> bool:
    """Join the cluster at `ray.address` / RAY_ADDRESS, or start Ray in-process. True if started here."""
    import ray

    address = config.ray.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        _check_reachable(address)
    # Quiet: our LiveStatus replaces Tune's tables (legacy output at verbose=0 prints nothing).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    if address:
        # Ship this checkout's code to the cluster's workers; data goes through the object store.
        excludes = ["data/", ".dvc/", ".git/", ".venv/", "mlflow.db", "mlartifacts/", "*.egg-info/"]
        runtime_env = {"working_dir": str(repo), "excludes": excludes}
        ray.init(address=address, runtime_env=runtime_env, **quiet)
        return False
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
    return True


def _experiment_name(storage: str) -> str:
    name = time.strftime("train-%Y%m%d-%H%M%S", time.gmtime())
    if "://" not in storage:  # keep one local run's trial folders, not every run's
        for old in Path(storage).glob("train-*"):
            shutil.rmtree(old, ignore_errors=True)
    return name


def train(
    config: StudyConfig, points_dir: Path, images_dir: Path, out: Path, metrics_out: Path, repo: Path
) -> dict[str, Any]:
    # Everything that can be wrong with params or inputs is found before Ray or MLflow start.
    variants = space.expand(config)
    kinds = {v.input_kind for v in variants}
    points = open_dataset(points_dir, "points")
    images = open_dataset(images_dir, "images") if "image" in kinds else None
    classes = points.manifest["classes"]
    in_channels = len(images.manifest["channels"]) if images else 4
    space.check(config, variants, len(classes), in_channels)
    if (
        config.train.gpus_per_trial > 0
        and not torch.cuda.is_available()
        and not (config.ray.address or os.environ.get("RAY_ADDRESS"))
    ):
        raise ConfigError(
            f"train.gpus_per_trial = {config.train.gpus_per_trial} is not allowed here: this machine has no "
            "CUDA device; use 0, or run on a cluster with GPU workers (ray.address / RAY_ADDRESS)"
        )

    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from pipeline.training.status import LiveStatus
    from pipeline.training.tracking import MlflowTrials, git_commit, start_parent, tracking_uri

    point_data = image_data = None
    if "points" in kinds:
        labels = points.array("train_labels")
        point_data = _split_data(config, points.array("train_points"), labels)
    if images is not None:
        labels = images.array("train_labels")
        res = config.images.train_resolution
        image_data = _split_data(config, images.array(f"train_r{res}"), labels)

    # Ray first: an unreachable cluster fails before an MLflow run is opened for nothing.
    started_here = _connect_ray(config, repo)
    began = time.monotonic()
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
        uri = tracking_uri(config.mlflow.tracking_uri, repo)
        client = MlflowClient(tracking_uri=uri)
        dataset_hashes = {
            "points": points.manifest_sha256,
            "images": images.manifest_sha256 if images else "",
        }
        tags = {
            "git_commit": git_commit(repo),
            "dataset.points.sha256": dataset_hashes["points"],
            "dataset.images.sha256": dataset_hashes["images"],
            "stage": "train",
        }
        # With a SQLite store, artifacts go beside it wherever the stage runs from.
        artifacts = (repo / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
        parent_id = start_parent(
            client,
            config.mlflow.experiment,
            time.strftime("study %Y-%m-%d %H:%M:%S"),
            tags,
            study_flat,
            artifacts,
        )
        storage = _storage(config, repo)
        search = space.is_search(config, variants)
        scheduler = config.train.scheduler
        use_asha = scheduler == "asha" or (scheduler == "auto" and search)
        total_trials = len(variants) * config.train.num_samples
        resources = {"cpu": config.train.cpus_per_trial, "gpu": config.train.gpus_per_trial}
        # What trials see: the study's knobs (variants come in as `trial.*`) and the data's facts.
        trial_flat = {k: v for k, v in study_flat.items() if not k.startswith("train.models.")}
        trial_flat.update({"data.num_classes": len(classes), "data.in_channels": in_channels})
        mlflow_callback = MlflowTrials(client, parent_id)
        print(
            f"train: {total_trials} trials ({len(variants)} variants x {config.train.num_samples} samples), "
            f"{config.train.epochs} epochs, {resources['cpu']:g} CPU + {resources['gpu']:g} GPU per trial"
            f"{', ASHA' if use_asha else ''}; MLflow {uri}, run {parent_id}",
            flush=True,
        )
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, images=image_data, points=point_data), resources
        )
        tuner = tune.Tuner(
            trainable,
            param_space=space.param_space(config, variants, trial_flat),
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode=MODE,
                num_samples=config.train.num_samples,
                max_concurrent_trials=config.train.max_concurrent_trials or None,
                search_alg=BasicVariantGenerator(random_state=config.seed),
                scheduler=ASHAScheduler(
                    time_attr="training_iteration",
                    max_t=config.train.epochs,
                    grace_period=min(config.train.grace_period, config.train.epochs),
                )
                if use_asha
                else None,
            ),
            run_config=tune.RunConfig(
                name=_experiment_name(storage),
                storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=config.train.max_failures),
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=2, checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE
                ),
                callbacks=[mlflow_callback, LiveStatus(total_trials, METRIC)],
                verbose=0,
            ),
        )
        grid = tuner.fit()
        rows = _trial_rows(grid, mlflow_callback)
    except BaseException:
        if parent_id is not None:
            client.set_terminated(parent_id, status="FAILED")
        raise
    finally:
        if started_here:
            import ray

            ray.shutdown()
    wall = time.monotonic() - began

    failed = [r for r in rows if r["status"] == "ERROR"]
    if failed:
        client.set_terminated(parent_id, status="FAILED")
        first = failed[0]
        raise TrainingError(
            f"{len(failed)} trial(s) failed after {config.train.max_failures} retries, e.g. "
            f"{first['variant']} ({first['trial_id']}): {first['error']}; see MLflow run {parent_id}"
        )

    best = _best_per_variant(rows, variants)
    summary = {
        "mlflow": {"tracking_uri": uri, "experiment": config.mlflow.experiment, "parent_run_id": parent_id},
        "storage": storage,
        "datasets": dataset_hashes,
        "wall_seconds": round(wall, 1),
        "variants": {
            name: {k: row[k] for k in ("trial_id", "family", "val_accuracy", "best_epoch", "checkpoint_file")}
            for name, row in best.items()
        },
    }
    metrics = {
        "val_accuracy": {name: row["val_accuracy"] for name, row in best.items()},
        "trials": len(rows),
        "retries": sum(r["retries"] for r in rows),
    }

    with atomic_output_dir(out) as folder:
        (folder / "models").mkdir()
        for name, row in best.items():
            _export_checkpoint(Path(row["checkpoint_path"]), folder / "models" / f"{name}.pt", row)
        _write_table(rows, folder)
        (folder / "study.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    write_json_atomic(metrics_out, metrics)

    # Models and the table go to MLflow once the outputs are safe on disk.
    _log_models(client, rows)
    now = int(time.time() * 1000)
    client.log_batch(
        parent_id,
        metrics=[
            Metric(f"best_val_accuracy.{name}", row["val_accuracy"], now, 0) for name, row in best.items()
        ]
        + [Metric("train_wall_seconds", wall, now, 0)],
    )
    client.log_artifact(parent_id, str(out / "trials.csv"))
    client.set_terminated(parent_id, status="FINISHED")
    print(f"train: {len(rows)} trials in {wall:.0f} s; best of every variant in {out / 'models'}")
    for name, row in best.items():
        print(f"  {name:24s} val_accuracy {row['val_accuracy']:.3f} (epoch {row['best_epoch']})")
    return summary


# ---------------------------------------------------------------------------------------------------------


def _trial_rows(grid, mlflow_callback) -> list[dict[str, Any]]:
    """One row per trial from the real run: config, metrics, node, duration, retries, best checkpoint."""
    rows = []
    for result in grid:
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
                "checkpoint_file": f"models/{trial['name']}.pt",
            }
        )
    rows.sort(key=lambda r: (r["variant"], r["trial_id"]))
    return rows


def _best_per_variant(rows: list[dict], variants: list[space.Variant]) -> dict[str, dict]:
    best: dict[str, dict] = {}
    for variant in variants:
        candidates = [r for r in rows if r["variant"] == variant.name and r["checkpoint_path"]]
        if not candidates:
            raise TrainingError(f"variant {variant.name}: no trial left a checkpoint")
        best[variant.name] = max(
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
