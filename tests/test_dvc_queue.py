"""DVC's experiment queue with the real tools: queued variants of a tiny study run side by side
(`dvc queue start -j 2`) and keep every record in the repository's MLflow store; a queued experiment whose
worker is killed mid-training is restored, not retrained, when it runs again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import make_study_repo, run_command, tool_env, wait_for

pytestmark = pytest.mark.slow

MODELS = {"pointnet": {"augment": {"grid": ["none", "so3"]}}, "vit": {}}  # 3 variants
SEEDS = [0, 1]
TRIALS = 3 * len(SEEDS)


def _queue_repo(tmp_path: Path, epochs: int, seeds: list[int] = SEEDS, fault: dict | None = None) -> Path:
    """A committed study repository (the queue runs a git clone of the last commit)."""
    train = {"all_families": False, "epochs": epochs} | ({"fault": fault} if fault else {})
    override = {"seeds": seeds, "train": train}
    root = make_study_repo(tmp_path, override, models=MODELS)
    run_command(["git", "add", "-A"], root)
    run_command(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "study"], root)
    return root


def _start_queue(root: Path, jobs: int) -> None:
    """`dvc queue start -j jobs`, returning as soon as the workers are up: they run on in the background
    with our pipes, so capturing its output would wait for the whole queue."""
    subprocess.run(
        ["dvc", "queue", "start", "-j", str(jobs)], cwd=root, env=tool_env(), check=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
    )  # fmt: skip


def _queue_status(root: Path) -> dict[str, str]:
    """Experiment name -> its status in `dvc queue status`."""
    lines = run_command(["dvc", "queue", "status"], root).stdout.splitlines()
    rows = [line.split() for line in lines[1:] if line.strip() and not line.startswith("Worker")]
    return {row[1]: row[-1] for row in rows if len(row) >= 4}


def _wait_for_queue(root: Path, names: list[str], timeout: float = 900) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _queue_status(root)
        if all(status.get(n) in ("Success", "Failed") for n in names):
            return status
        time.sleep(2)
    raise AssertionError(f"the queue did not finish in {timeout:g} s: {_queue_status(root)}")


def _results(root: Path) -> dict[str, dict[str, list[dict]]]:
    """Tune run folder -> trial folder -> the results it reported, from the repository's trial storage."""
    runs: dict[str, dict[str, list[dict]]] = {}
    for path in sorted(root.glob("data/ray_results/train-*/*/result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        runs.setdefault(path.parent.parent.name, {})[path.parent.name] = rows
    return runs


def _runs(root: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "perception-study"]
    return client.search_runs([experiment.experiment_id], max_results=1000)


def test_two_queued_variants_run_side_by_side_and_keep_every_record(tmp_path):
    # Each study's ViT trial stops for a while on one core: however fast the other trials run, each study
    # is still training when the other's trials take the free core, so the two overlap.
    pause = {"model": "vit", "epoch": 1, "kind": "pause", "pause_seconds": 10}
    root = _queue_repo(tmp_path, epochs=2, fault=pause)
    names = ["side-a", "side-b"]
    for name, epochs in zip(names, (1, 2), strict=True):
        run_command(["dvc", "exp", "run", "--queue", "-S", f"train.epochs={epochs}", "-n", name], root)
    _start_queue(root, 2)
    status = _wait_for_queue(root, names)
    logs = {name: run_command(["dvc", "queue", "logs", name], root, check=False).stdout for name in names}
    assert status == {"side-a": "Success", "side-b": "Success"}, logs
    for name in names:
        assert "database is locked" not in logs[name], logs[name]
        assert f"MLflow sqlite:///{root.resolve() / 'mlflow.db'}" in logs[name]  # the repository's store

    # dvc exp show compares them.
    shown = json.loads(run_command(["dvc", "exp", "show", "--json"], root).stdout)
    experiments = {
        rev["name"]: rev["data"]["metrics"]
        for baseline in shown
        for exp in baseline.get("experiments") or []
        for rev in exp["revs"]
    }
    for name in names:
        metrics = experiments[name]
        assert metrics["metrics/train.json"]["data"]["trials"] == TRIALS
        assert "rotation" in json.dumps(metrics["metrics/evaluate.json"]["data"])

    # The repository's MLflow store holds both studies: a parent and a run per trial each, tagged.
    runs = _runs(root)
    for name in names:
        mine = [r for r in runs if r.data.tags.get("dvc.exp_name") == name]
        parents = [r for r in mine if r.data.tags.get("stage") == "train"]
        assert len(parents) == 1, [r.data.tags for r in mine]
        trials = [r for r in mine if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
        assert len([r for r in trials if "trial_id" in r.data.tags]) == TRIALS
        assert all(r.info.status == "FINISHED" for r in trials + parents)
    assert not list((root / ".dvc/tmp").rglob("mlflow.db"))  # nothing left in DVC's temporary folders

    # They trained at the same time, and together never on more cores than the machine has.
    runs_by_study = _results(root)
    assert len(runs_by_study) == 2  # one Tune run per experiment, kept in the repository
    held = {
        study: [(rows[0]["cores_held_since"], rows[-1]["reported_at"]) for rows in trials.values()]
        for study, trials in runs_by_study.items()
    }
    (first, second) = held.values()
    spans = [(min(a for a, _ in h), max(b for _, b in h)) for h in (first, second)]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans  # the two studies overlapped
    intervals = first + second
    most = max(sum(a <= t < b for a, b in intervals) for t, _ in intervals)
    assert most <= (os.cpu_count() or 1), intervals


def _stage_process(root: Path, stage: str) -> psutil.Process | None:
    """The `python -m pipeline <stage>` process of a queued experiment (it runs in DVC's clone)."""
    exps = str((root / ".dvc/tmp/exps").resolve())
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmdline, cwd = proc.info["cmdline"] or [], proc.info["cwd"] or ""
        if cwd.startswith(exps) and "pipeline" in cmdline and stage in cmdline:
            return proc
    return None


def test_a_queued_experiment_whose_worker_dies_is_restored_when_it_runs_again(tmp_path):
    seeds = [0, 1, 2, 3]  # 12 trials: most are still to run when the worker dies
    trials = 3 * len(seeds)
    # ViT's first attempts stop for a while after their first epoch (and its checkpoint), computing nothing
    # different: however fast the other trials run, one is mid-run when the worker dies.
    pause = {"model": "vit", "epoch": 2, "kind": "pause", "pause_seconds": 30}
    root = _queue_repo(tmp_path, epochs=3, seeds=seeds, fault=pause)
    run_command(["dvc", "exp", "run", "--queue", "-n", "cut-short"], root)
    _start_queue(root, 1)

    def finished() -> set[str]:
        runs = _results(root)
        rows = next(iter(runs.values()), {})
        return {name for name, r in rows.items() if r and r[-1]["epoch"] == 3}

    def paused() -> bool:
        rows = next(iter(_results(root).values()), {})
        return any(name.startswith("vit") and len(r) == 1 for name, r in rows.items())

    # (polled on the files, not with `dvc queue status`: it takes seconds, the trials less)
    wait_for(lambda: len(finished()) >= 2 and paused(), 600, what="two trials finished and one paused")
    time.sleep(2.5)  # Tune saves its run state every second
    driver = _stage_process(root, "train")
    assert driver is not None, "the queued experiment's train stage is not running"
    for proc in [*driver.children(recursive=True), driver]:  # the worker and its in-process Ray
        proc.send_signal(signal.SIGKILL)
    assert _wait_for_queue(root, ["cut-short"])["cut-short"] == "Failed"

    before = next(iter(_results(root).values()))
    done_before = finished()
    assert 2 <= len(done_before) < trials, f"killed too late: {len(done_before)} trials had finished"

    run_command(["dvc", "exp", "run", "--queue", "-n", "again"], root)
    _start_queue(root, 1)
    status = _wait_for_queue(root, ["again"])
    log = run_command(["dvc", "queue", "logs", "again"], root, check=False).stdout
    assert status["again"] == "Success", log
    assert "restoring the interrupted run" in log, log

    (after,) = _results(root).values()  # the same Tune run, restored in place
    assert len(after) == trials
    for name in done_before:  # not trained again: no new result lines
        assert after[name] == before[name], name
    for rows in after.values():
        assert [r["epoch"] for r in rows][-3:] == [1, 2, 3]
    parents = [r for r in _runs(root) if r.data.tags.get("stage") == "train"]
    assert len(parents) == 1 and parents[0].data.tags.get("restores") == "1"  # the same parent run
