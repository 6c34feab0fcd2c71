"""The train stage's Ray side: joining or starting Ray, the Tune run's folder and restore state, the Tuner.

A study's Tune run lives in `<storage>/train-<hash>`, the hash of what its trials depend on, beside
`study-run.json`: which MLflow parent run it belongs to and whether it finished. The next run of the same
params restores a run that did not finish (`Tuner.restore`), and starts afresh otherwise. The default
storage is in the repository the user runs DVC in (`home_repo`), so that a queued experiment's run
outlives DVC's temporary clone. While a driver trains, it holds `<storage>/train-<hash>.lock`: studies
side by side never remove a folder another one is training in, and two of the same hash take turns.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, StudyConfig, home_repo, resolve_path
from pipeline.outputs import write_json_atomic
from pipeline.parallel import in_use, locked
from pipeline.training import space

METRIC, MODE = "val_accuracy", "max"
CHECKPOINTS_KEPT = 2  # Ray keeps a trial's this many best checkpoints, and its latest


def storage_path(config: StudyConfig, repo: Path) -> str:
    """Trial storage: a URI as given, a path made absolute (trials run with their own working folders),
    relative ones from the repository the user runs DVC in, not from a queued experiment's clone."""
    storage = config.ray.storage
    if "://" in storage:
        return storage
    return str(resolve_path(storage or "data/ray_results", home_repo(repo)).resolve())


def lock_path(experiment: str) -> Path:
    """The lock a driver holds while it trains in the local Tune run folder `experiment`."""
    return Path(experiment + ".lock")


@contextlib.contextmanager
def holding(experiment: str) -> Iterator[None]:
    """Hold the Tune run folder `experiment` for this driver (nothing to hold in remote storage): another
    study of the same trials, beside this one, waits for it to finish."""
    if "://" in experiment:
        yield
        return

    def waiting() -> None:
        print(f"train: another study is training the same trials in {experiment}; waiting for it", flush=True)

    with locked(lock_path(experiment), waiting):
        yield


def check_reachable(address: str) -> None:
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


def loopback_only() -> None:
    """In-process Ray listens on 127.0.0.1 only. Ray does that where it runs no multi-node clusters,
    chosen by this variable when `ray` is imported; set here for this process and the ones it starts."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if "ray._private.ray_constants" in sys.modules:  # ray was imported before (a test, a notebook): it read
        from ray._private import ray_constants  # the flag then

        ray_constants.ENABLE_RAY_CLUSTER = False


def connect_ray(config: StudyConfig, repo: Path) -> bool:
    """Join the cluster at `ray.address` / RAY_ADDRESS, or start Ray in-process. True if started here."""
    import ray

    address = config.ray.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        check_reachable(address)
    # Quiet: our LiveStatus replaces Tune's tables (legacy output at verbose=0 prints nothing).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune saves its run state this often (by default every 10 s or more): a driver killed just after a
    # trial finished then finds it finished on restore, and does not train it again.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    quiet: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    if address:
        # Ship this checkout's code to the cluster's workers; data goes through the object store.
        excludes = ["data/", ".dvc/", ".git/", ".venv/", "mlflow.db", "mlartifacts/", "*.egg-info/"]
        runtime_env = {"working_dir": str(repo), "excludes": excludes}
        ray.init(address=address, runtime_env=runtime_env, **quiet)
        return False
    loopback_only()
    # "local": a new instance even where `ray start` left a cluster that ray.init would otherwise join.
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
    return True


def concurrent_slots(config: StudyConfig, total_trials: int) -> int:
    """How many trials can run at once on the joined Ray: the CPUs, GPUs and `max_concurrent_trials` allow."""
    import ray

    resources = ray.cluster_resources()
    limits = [total_trials, int(resources.get("CPU", 0) // config.train.cpus_per_trial)]
    if config.train.gpus_per_trial > 0:
        limits.append(int(resources.get("GPU", 0) // config.train.gpus_per_trial))
    if config.train.max_concurrent_trials:
        limits.append(config.train.max_concurrent_trials)
    return max(1, min(limits))


def slot_utilisation(busy_seconds: list[float], wall_seconds: float, slots: int) -> float:
    """The share of the run's trial slots that trials kept busy: sum of the trials' own time over (wall time
    x concurrent slots). What is left is the scheduler's gaps (starting workers, restoring) and the tail
    where fewer trials are left than slots."""
    return float(sum(busy_seconds)) / max(wall_seconds * slots, 1e-9)


def check_cluster_cpus(config: StudyConfig) -> None:
    """A trial must fit on the joined cluster's CPUs."""
    import ray

    cluster_cpus = ray.cluster_resources().get("CPU", 0)
    if cluster_cpus < config.train.cpus_per_trial:
        raise ConfigError(
            f"train.cpus_per_trial = {config.train.cpus_per_trial:g} is not allowed: the Ray cluster has "
            f"{cluster_cpus:g} CPUs"
        )


# The experiment folder keeps this file beside Tune's own state: which study run it belongs to and whether
# it finished. A folder whose run did not finish is restored by the next run of the same params.
RUN_STATE = "study-run.json"


def experiment_name(config: StudyConfig, dataset_hashes: dict[str, str]) -> str:
    """`train-<hash>` of what the trials depend on (the seed, `train.*`, the datasets): the same study
    finds its interrupted run again, a changed one starts its own."""
    flat = config.flat()
    relevant = {k: v for k, v in flat.items() if k in ("seed", "seeds") or k.startswith("train.")}
    payload = json.dumps({"params": relevant, "datasets": dataset_hashes}, sort_keys=True, default=str)
    return "train-" + hashlib.sha256(payload.encode()).hexdigest()[:12]


def read_state(experiment: str) -> dict[str, Any]:
    try:
        if "://" in experiment:
            from pyarrow import fs

            filesystem, path = fs.FileSystem.from_uri(experiment)
            with filesystem.open_input_stream(f"{path}/{RUN_STATE}") as handle:
                return json.loads(handle.read())
        return json.loads((Path(experiment) / RUN_STATE).read_text())
    except (OSError, ValueError):
        return {}


def write_state(experiment: str, state: dict[str, Any]) -> None:
    if "://" in experiment:
        from pyarrow import fs

        filesystem, path = fs.FileSystem.from_uri(experiment)
        filesystem.create_dir(path, recursive=True)
        with filesystem.open_output_stream(f"{path}/{RUN_STATE}") as handle:
            handle.write(json.dumps(state, indent=2, sort_keys=True).encode())
        return
    write_json_atomic(Path(experiment) / RUN_STATE, state)


def check_trusted(experiment: Path) -> None:
    """Restoring unpickles Tune's state: only from a folder this user owns and nobody else can write."""
    for path in (experiment, experiment / "tuner.pkl"):
        info = path.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            raise ConfigError(
                f"{path}: not restoring a Tune run from a file or folder another user owns or can write "
                "(restoring unpickles it); remove the folder to train from scratch"
            )


def clear_local_runs(storage: str, keep: str | None) -> None:
    """Remove local Tune runs but `keep` (the one being restored) and those another driver is training in
    (a study beside this one): a finished run of the same params is trained again, and old runs'
    checkpoints would pile up in data/ray_results."""
    for old in Path(storage).glob("train-*"):
        if old.is_dir() and old.name != keep and not in_use(lock_path(str(old))):
            shutil.rmtree(old, ignore_errors=True)


def use_asha(config: StudyConfig, variants: list[space.Variant]) -> bool:
    scheduler = config.train.scheduler
    return scheduler == "asha" or (scheduler == "auto" and space.is_search(config, variants))


def epochs_text(config: StudyConfig, variants: list[space.Variant]) -> str:
    """`8 epochs`, `8 epochs (vit 20)` or, where every variant sets its own, `epochs: e3nn 20, vit 16`: the
    study's epochs and the variants that set their own."""
    own = [
        f"{v.name} {space.variant_epochs(config, v)}"
        for v in variants
        if space.variant_epochs(config, v) != config.train.epochs
    ]
    if own and len(own) == len(variants):
        return f"epochs: {', '.join(own)}"
    return f"{config.train.epochs} epochs" + (f" ({', '.join(own)})" if own else "")


def new_tuner(
    config: StudyConfig, trainable, param_space: dict, name: str, storage: str, reuse_actors: bool = False
):
    """A Tuner for a fresh run: a grid over variants and seeds, ASHA where a search is configured.

    `reuse_actors` (Ray in-process): a finished trial's worker process takes the next trial, its imports
    warm, instead of a new process paying 5-8 s to start and import torch, e3nn and the rest. On a cluster
    fresh actors spread the trials over the nodes (a reused one keeps them on its node) and a dead node
    takes only its own trials with it.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    variants = space.expand(config)
    max_epochs = space.max_epochs(config, variants)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            num_samples=config.train.num_samples,
            max_concurrent_trials=config.train.max_concurrent_trials or None,
            search_alg=BasicVariantGenerator(random_state=config.seed),
            reuse_actors=reuse_actors,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
            scheduler=ASHAScheduler(
                time_attr="training_iteration",
                max_t=max_epochs,
                grace_period=min(config.train.grace_period, max_epochs),
            )
            if use_asha(config, variants)
            else None,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=config.train.max_failures),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=CHECKPOINTS_KEPT, checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE
            ),
            verbose=0,
        ),
    )


def trial_name(trial) -> str:
    """`<variant>-s<seed>_<trial id>`: the variant and training seed in Tune's name and folder."""
    return f"{space.trial_label(trial.config)}_{trial.trial_id}"
