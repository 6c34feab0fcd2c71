"""The train stage's results: one row per trial from Tune's results, the best trial of every variant and
seed, the exported checkpoints, the trials table (`trials.csv`, `trials.json`) and the stage's summaries."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from perception.models.checkpoint import ModelCheckpoint, save_checkpoint
from pipeline.errors import TrainingError
from pipeline.training import space
from pipeline.training.session import CHECKPOINTS_KEPT, METRIC, MODE
from pipeline.training.trainable import CHECKPOINT_FILE

if TYPE_CHECKING:
    from ray.tune import Result, ResultGrid


def results_of(grid: ResultGrid) -> list[Result]:
    """The grid's results in trial order (a ResultGrid indexes, but declares no iteration)."""
    return [grid[i] for i in range(len(grid))]


def exported_epoch(curve: list[float], kept: int = CHECKPOINTS_KEPT) -> int:
    """The epoch (from 1) whose weights a trial with this validation curve exports: its best, and where
    several epochs tie for it, the one Ray's checkpoint manager returns. Ray ranks checkpoints by score, a
    later one of equal score above an earlier one, deletes all but the top `kept` (and the latest), and
    `Result.get_best_checkpoint` returns the first of the best it kept: of n tied epochs, the (n - kept +
    1)-th, or the first where n <= kept. The screen (`benchmarks/screen.py`) keeps the same one."""
    if not curve:
        raise ValueError("an empty validation curve has no best epoch")
    best = max(curve)
    tied = [epoch for epoch, accuracy in enumerate(curve, start=1) if accuracy == best]
    return tied[max(0, len(tied) - kept)]


def trial_rows(results, mlflow_callback) -> list[dict[str, Any]]:
    """One row per trial from the real run: config, metrics, node, duration, retries, best checkpoint."""
    rows = []
    for result in results:
        config = result.config
        trial = config["trial"]
        history = result.metrics_dataframe
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        best_ckpt = result.get_best_checkpoint(METRIC, MODE) if result.checkpoint else None
        best_epoch, best_acc, curve, correct = 0, float("nan"), [], []
        if history is not None and len(history) and METRIC in history:
            top = history.loc[history[METRIC].idxmax()]
            best_epoch, best_acc = int(top["epoch"]), float(top[METRIC])
            # One value per epoch (a retried or restored epoch reports again: its last report counts).
            by_epoch = history.groupby("epoch")
            curve = [float(v) for v in by_epoch[METRIC].last().sort_index()]
            if "val_correct" in history:
                correct = [str(v) for v in by_epoch["val_correct"].last().sort_index()]
        if best_ckpt is not None:
            # Epochs tied for the best accuracy: Ray keeps `num_to_keep` checkpoints and the latest, so the
            # one it returns can be a later epoch of the tie than the history's first. Name the epoch whose
            # weights are exported.
            kept = [m for c, m in result.best_checkpoints if c.path == best_ckpt.path and "epoch" in m]
            if kept:
                best_epoch, best_acc = int(kept[0]["epoch"]), float(kept[0][METRIC])
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
                "val_curve": [round(v, 6) for v in curve],
                "val_samples": int(metrics.get("val_samples", 0)),
                "val_correct": correct,  # per epoch, perception.training.pack_correct's hex
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


def busy_seconds(results, since: float) -> list[float]:
    """Each trial's own time in this run: its epochs' `time_this_iter_s` (the first one from the trial's
    start) reported at or after `since` (time.time()), so that a restored run counts only what it ran."""
    busy = []
    for result in results:
        history = result.metrics_dataframe
        if history is None or not len(history) or "reported_at" not in history:
            continue
        mine = history[history["reported_at"] >= since]
        busy.append(float(mine["time_this_iter_s"].sum()))
    return busy


def best_per_variant(rows: list[dict], variants: list[space.Variant], seeds: tuple[int, ...]) -> dict:
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


def export_checkpoint(source: Path, target: Path, row: dict) -> None:
    """The model part of a trial checkpoint (no optimiser state): `perception.models.checkpoint`'s format,
    rebuilt by `perception.models.build` alone."""
    state = torch.load(source, map_location="cpu", weights_only=True)
    training = {**state["training"], "trial_id": row["trial_id"], "epochs_trained": state["epoch"] + 1}
    checkpoint = ModelCheckpoint(
        state["family"], state["model_config"], state["model"], training, state["metrics"]
    )
    save_checkpoint(target, checkpoint)


TABLE_COLUMNS = (
    "trial_id", "variant", "family", "status", "epochs", "val_accuracy", "best_epoch", "final_val_accuracy",
    "final_train_loss", "node_id", "hostname", "device", "duration_s", "retries", "seed", "settings",
    "mlflow_run_id", "error",
)  # fmt: skip


def write_table(rows: list[dict], folder: Path) -> None:
    with open(folder / "trials.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=TABLE_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "settings": json.dumps(row["settings"], sort_keys=True)})
    public = [{k: row[k] for k in TABLE_COLUMNS} for row in rows]
    (folder / "trials.json").write_text(json.dumps(public, indent=2, sort_keys=True, default=str) + "\n")


SUMMARY_KEYS = (
    "trial_id", "family", "val_accuracy", "best_epoch", "val_curve", "val_samples", "val_correct",
    "checkpoint_file", "mlflow_run_id",
)  # fmt: skip


def study_summary(
    best: dict, variants: list[space.Variant], seeds: tuple[int, ...], **facts: Any
) -> dict[str, Any]:
    """`study.json`: the facts of the run (MLflow, storage, datasets, time) and each variant's best trials."""
    return {
        **facts,
        "seeds": list(seeds),
        "variants": {
            v.name: {str(seed): {k: best[v.name, seed][k] for k in SUMMARY_KEYS} for seed in seeds}
            for v in variants
        },
    }


def study_metrics(best: dict, variants: list[space.Variant], seeds: tuple[int, ...], trials: int) -> dict:
    """`metrics/train.json`: results only (how often trials were retried is in the table and MLflow)."""
    by_seed = {v.name: {str(s): round(best[v.name, s]["val_accuracy"], 6) for s in seeds} for v in variants}
    return {
        "val_accuracy": {
            v.name: round(float(np.mean([best[v.name, s]["val_accuracy"] for s in seeds])), 6)
            for v in variants
        },
        "val_accuracy_by_seed": by_seed,
        "trials": trials,
    }


def failed_trials_error(failed: list[dict], max_failures: int, parent_id: str) -> TrainingError:
    """The failed trials' table, one line each, printed before the stage's own one-line error."""
    print("train: failed trials (variant, seed, reason):")
    for row in failed:
        print(f"  {row['variant']}  seed {row['seed']}  {row['error']}")
    first = failed[0]
    return TrainingError(
        f"{len(failed)} trial(s) failed after {max_failures} retries, e.g. "
        f"{first['variant']} ({first['trial_id']}): {first['error']}; see MLflow run {parent_id}"
    )
