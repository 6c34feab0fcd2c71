"""One Ray Tune trial: build the variant's model, train it epoch by epoch, report and checkpoint each epoch.

A retried trial resumes from its last checkpoint (model, optimiser, schedule and the batch generator's
state), so a retry continues the same run rather than starting over, and `retries` counts the attempts.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from perception.allocator import keep_freed_blocks
from perception.models import FAMILIES, build
from perception.models.checkpoint import model_config
from perception.training import (
    StepSettings,
    adamw,
    correct,
    pack_correct,
    parameter_groups,
    random_state,
    restore_random_state,
    train_one_epoch,
    warmup_cosine,
)
from pipeline.parallel import cpu_slots
from pipeline.training.space import TRAINING_KEYS, model_hparams, resolved, task_data, trial_dataset

CHECKPOINT_FILE = "trial.pt"
# `trial.*` keys of a flat config that are not the model's hparams.
NOT_HPARAMS = ("trial.name", "trial.model", "trial.family", "trial.seed")


class InjectedFault(RuntimeError):
    """Raised by the test-only `train.fault` setting to exercise retries."""


class TrialOutOfMemory(RuntimeError):
    """A trial that ran out of GPU memory: one line for the trials table and MLflow, saying what to change."""


@dataclass(frozen=True)
class TrialData:
    """The arrays trials of one input kind train on; in Ray's object store once, shared by all trials."""

    train_inputs: np.ndarray  # images float32[N, C, H, W] or clouds float32[N, P, 3]
    train_labels: np.ndarray  # int64[N]
    val_inputs: np.ndarray
    val_labels: np.ndarray


def trial_settings(flat: dict[str, Any]) -> dict[str, Any]:
    """epochs, lr, weight_decay, batch_size, points_per_cloud, warmup_epochs, grad_clip: the trial's own
    value, else the study's."""
    return {key: flat.get(f"trial.{key}", flat[f"train.{key}"]) for key in TRAINING_KEYS}


def step_settings(flat: dict[str, Any]) -> StepSettings:
    """How each of a trial's steps runs: batch size, augmentation, points per cloud, clipping, bf16."""
    settings = trial_settings(flat)
    return StepSettings(
        batch_size=int(settings["batch_size"]),
        augment=flat.get("trial.augment", "none"),
        points_per_cloud=int(settings["points_per_cloud"]),
        grad_clip=float(settings["grad_clip"]),
        bf16=bool(flat["train.bf16"]),
    )


def trial_optimizer(model: torch.nn.Module, flat: dict[str, Any]) -> torch.optim.AdamW:
    """AdamW at the trial's lr, decaying every parameter but those `parameter_groups` keeps."""
    settings = trial_settings(flat)
    groups = parameter_groups(model, float(settings["weight_decay"]))
    return adamw(groups, float(settings["lr"]))


def training_record(flat: dict[str, Any]) -> dict[str, Any]:
    """How a trial trains, in plain values: what its checkpoint keeps beside the model's own config."""
    return {
        "variant": flat["trial.name"],
        "model": flat["trial.model"],
        "seed": int(flat["trial.seed"]),
        "data_seed": int(flat["seed"]),
        "task": flat.get("trial.task", "shapes"),
        "dataset": trial_dataset(flat),
        "augment": flat.get("trial.augment", "none"),
        "bf16": bool(flat["train.bf16"]),
        **trial_settings(flat),
    }


def build_model(flat: dict[str, Any]) -> torch.nn.Module:
    """A trial's model from its flat resolved config alone: `trial.*` settings and the `data.*` facts."""
    family = flat["trial.family"]
    settings = {
        k[len("trial.") :]: v for k, v in flat.items() if k.startswith("trial.") and k not in NOT_HPARAMS
    }
    from_data = task_data(flat, FAMILIES[family].input_kind, flat.get("trial.task", "shapes"))
    return build(family, settings["size"], **model_hparams(family, settings, from_data))


def _device(flat: dict[str, Any]) -> torch.device:
    # Ray sets CUDA_VISIBLE_DEVICES to the trial's GPUs; without a GPU share the trial runs on CPU.
    if flat["train.gpus_per_trial"] > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def run_trial(
    trial_config: dict[str, Any],
    images: TrialData | None,
    points: TrialData | None,
    proximity: TrialData | None = None,
    cpu_slots_folder: str | None = None,
) -> None:
    """The Tune function trainable (wrapped by `tune.with_parameters` so the arrays travel once).

    With `cpu_slots_folder` (Ray in-process) the trial trains while it holds its cores among every study
    on this machine (`pipeline.parallel.cpu_slots`); on a cluster Ray's own accounting is enough.
    """
    flat = resolved(trial_config)
    slots = (
        cpu_slots(flat["train.cpus_per_trial"], Path(cpu_slots_folder))
        if cpu_slots_folder
        else contextlib.nullcontext(0.0)
    )
    with slots as waited:
        held = {"cpu_wait_seconds": waited, "cores_held_since": time.time()}
        _train_trial(flat, {"points": points, "images": images, "proximity": proximity}, held)


def _train_trial(flat: dict[str, Any], data_by_kind: dict[str, TrialData | None], held: dict) -> None:
    from ray import tune

    keep_freed_blocks()  # each step reuses freed memory rather than fresh pages (perception.allocator)
    data = data_by_kind[trial_dataset(flat)]
    if data is None:
        raise RuntimeError(f"no {trial_dataset(flat)} data was handed to this trial")
    torch.set_num_threads(max(1, int(flat["train.cpus_per_trial"])))
    device = _device(flat)
    share = float(flat["train.gpus_per_trial"])
    if device.type == "cuda" and 0 < share < 1:
        # Trials sharing a GPU each keep to their fraction, so one cannot starve the others of memory.
        torch.cuda.set_per_process_memory_fraction(share)
    seed = int(flat["trial.seed"])
    torch.manual_seed(seed)

    settings = trial_settings(flat)
    step = step_settings(flat)
    model = build_model(flat).to(device)
    optimizer = trial_optimizer(model, flat)
    epochs = int(settings["epochs"])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(epochs, int(settings["warmup_epochs"]))
    )
    generator = torch.Generator().manual_seed(seed)

    start_epoch, attempt = 0, 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        restore_random_state(generator, state["random"])
        start_epoch, attempt = state["epoch"] + 1, state["attempt"] + 1

    train_x, train_y = torch.from_numpy(data.train_inputs), torch.from_numpy(data.train_labels)
    val_x, val_y = torch.from_numpy(data.val_inputs), torch.from_numpy(data.val_labels)
    context = {"node_id": _node_id(), "hostname": socket.gethostname(), "device": str(device)}
    fault_epoch = flat["train.fault.epoch"] if flat["train.fault.model"] == flat["trial.model"] else 0
    process = psutil.Process()
    process.cpu_percent(None)  # starts the CPU-time counter the first epoch's reading is measured from
    for epoch in range(start_epoch, epochs):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        faulty = attempt == 0 and fault_epoch and epoch + 1 == fault_epoch
        if faulty and flat["train.fault.kind"] == "error":
            raise InjectedFault(f"train.fault: {flat['trial.name']} fails at epoch {fault_epoch} (test-only)")
        if faulty and flat["train.fault.kind"] == "pause":
            time.sleep(flat["train.fault.pause_seconds"])  # mid-run, after the last epoch's checkpoint
        started = time.perf_counter()
        try:
            if faulty and flat["train.fault.kind"] == "oom":  # what torch raises when memory runs out
                raise torch.OutOfMemoryError("CUDA out of memory (train.fault, test-only)")
            loss = train_one_epoch(model, optimizer, train_x, train_y, step, generator, device)
        except torch.OutOfMemoryError:
            raise TrialOutOfMemory(
                f"{flat['trial.name']}: out of GPU memory at batch size {step.batch_size} with "
                f"{share:g} of a GPU per trial; lower the entry's batch_size or raise train.gpus_per_trial"
            ) from None
        schedule.step()
        val_correct = correct(model, val_x, val_y, step.batch_size, device, step.bf16)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss,
            "val_accuracy": float(val_correct.float().mean()),
            # Per sample, so that the report can put an interval on how much the curve still rises.
            "val_correct": pack_correct(val_correct),
            "val_samples": len(val_y),
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": time.perf_counter() - started,
            "retries": attempt,
            **held,  # how long it waited for cores other studies on this machine held, and since when
            "reported_at": time.time(),
            **system_metrics(process, device),
            **context,
        }
        with tempfile.TemporaryDirectory() as folder:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "random": random_state(generator),
                "epoch": epoch,
                "attempt": attempt,
                "family": flat["trial.family"],
                "model_config": model_config(model),
                "training": training_record(flat),
                "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
            }
            torch.save(state, Path(folder) / CHECKPOINT_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def system_metrics(process: psutil.Process, device: torch.device) -> dict[str, float]:
    """This trial process's own use over the epoch just ended (not the node's, nor the driver's): CPU in
    percent of one core, resident memory, and on CUDA the allocator's peak and the GPU's utilisation."""
    metrics = {
        "system/trial_cpu_percentage": process.cpu_percent(None),
        "system/trial_memory_rss_megabytes": process.memory_info().rss / 2**20,
    }
    if device.type == "cuda":
        metrics["system/gpu_memory_peak_megabytes"] = torch.cuda.max_memory_allocated(device) / 2**20
        with contextlib.suppress(Exception):  # utilisation needs NVML (nvidia-ml-py), not always present
            metrics["system/gpu_utilization_percentage"] = float(torch.cuda.utilization(device))
    return metrics


def _node_id() -> str:
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray (unit tests): the process is its own node
        return f"local-{os.getpid()}"
