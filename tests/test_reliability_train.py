"""The train stage under faults: a killed driver, a tracking server that is away; and its safe defaults.

Real parts throughout: `dvc repro` killed with SIGKILL and run again, a real `mlflow server` on loopback
stopped and started, Ray started by the stage itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import (
    REPO,
    MlflowServer,
    comparable_metrics,
    free_port,
    make_study_repo,
    run_command,
    tool_env,
    wait_for,
)

pytestmark = pytest.mark.slow

EPOCHS = 2  # TINY_TRAIN's
TRAIN_CMD = [
    sys.executable, "-m", "pipeline", "train", "--params", "params.yaml", "--points", "data/prepared/points",
    "--images", "data/prepared/images", "--out", "data/train", "--metrics", "metrics/train.json",
]  # fmt: skip


def _results(root: Path) -> dict[str, list[dict]]:
    """Trial folder name -> the results it reported (Tune's result.json, one JSON object a line)."""
    out = {}
    for path in root.glob("data/ray_results/train-*/*/result.json"):
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        out[path.parent.name] = [json.loads(line) for line in lines]
    return out


def _finished(results: dict[str, list[dict]]) -> set[str]:
    return {name for name, rows in results.items() if rows and rows[-1]["epoch"] == EPOCHS}


def _nested_runs(uri: str, parent_id: str) -> list:
    """The parent's trial runs (the evaluation's cost and derived-reading runs, nested too, left out)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000)
    return [run for run in runs if "trial_id" in run.data.tags]


def _steps(uri: str, run_id: str) -> list[int]:
    from mlflow import MlflowClient

    return sorted(m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "val_accuracy"))


def _run_state(root: Path) -> dict:
    (path,) = root.glob("data/ray_results/train-*/study-run.json")
    return json.loads(path.read_text())


TRIALS = 18  # make_study_repo's default study: 9 variants x 2 training seeds


# --- 1. the driver dies ---------------------------------------------------------------------------------


def test_a_killed_driver_is_restored_not_restarted_and_gives_the_same_metrics(tmp_path, smoke_study, spawn):
    # e3nn's first attempts stop for a while after their first epoch (and its checkpoint), computing
    # nothing different: whatever else has run by then, they are mid-run when the driver dies.
    pause = {"model": "e3nn", "epoch": 2, "kind": "pause", "pause_seconds": 30}
    root = make_study_repo(tmp_path, {"train": {"fault": pause}})
    run_command(["dvc", "repro", "prepare_points", "prepare_images"], root)
    log = open(tmp_path / "killed.log", "w")
    proc = spawn(["dvc", "repro"], cwd=root, env=tool_env(), stdout=log, stderr=subprocess.STDOUT)

    # Kill once some trials have finished and an e3nn trial is mid-run (Tune saves its state every second).
    def ready() -> bool:
        results = _results(root)
        paused = any(name.startswith("e3nn") and len(rows) == 1 for name, rows in results.items())
        return paused and len(_finished(results)) >= 2

    wait_for(ready, 600, proc, "two trials finished and one paused mid-run")
    time.sleep(2.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _results(root)
    finished_before = _finished(before)
    assert 2 <= len(finished_before) < TRIALS, f"killed too late: {len(finished_before)} trials had finished"
    assert not (root / "data/train").exists()
    state = _run_state(root)
    assert state["status"] == "running"

    rerun = run_command(["dvc", "repro"], root, env={})
    assert "restoring the interrupted run" in rerun.stdout, rerun.stdout

    after = _results(root)
    assert len(after) == TRIALS
    for name in finished_before:  # not trained again: no new result lines
        assert after[name] == before[name], name
    for rows in after.values():  # every trial complete, each epoch once
        assert [r["epoch"] for r in rows][-EPOCHS:] == list(range(1, EPOCHS + 1))

    # MLflow: the same parent run, one nested run per trial, each epoch logged once.
    study = json.loads((root / "data/train/study.json").read_text())
    uri, parent_id = study["mlflow"]["tracking_uri"], study["mlflow"]["parent_run_id"]
    assert parent_id == state["mlflow"]["parent_run_id"]
    runs = _nested_runs(uri, parent_id)
    trial_ids = [r.data.tags["trial_id"] for r in runs]
    assert len(runs) == TRIALS and len(set(trial_ids)) == TRIALS
    finished_ids = {before[name][-1]["trial_id"] for name in finished_before}
    # Trials that had reported an epoch but not finished were running when the driver died.
    reported = {name: rows for name, rows in before.items() if rows}
    cut_short = {rows[-1]["trial_id"] for name, rows in reported.items() if name not in finished_before}
    for run in runs:
        assert run.info.status == "FINISHED"
        assert _steps(uri, run.info.run_id) == list(range(1, EPOCHS + 1))
        trial_id = run.data.tags["trial_id"]
        # Tagged: every trial cut short mid-run, and none that had finished. (A trial that had started but
        # reported nothing yet, its run open, is cut short too; which ones those were the files cannot say.)
        if trial_id in cut_short:
            assert "interrupted" in run.data.tags, (trial_id, run.data.tags)
        if trial_id in finished_ids:
            assert "interrupted" not in run.data.tags, (trial_id, run.data.tags)
    assert not cut_short & finished_ids and cut_short  # some trials were mid-run when the driver died
    from mlflow import MlflowClient

    parent = MlflowClient(tracking_uri=uri).get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["restores"] == "1"

    # The same numbers as an uninterrupted study with the same seeds.
    assert comparable_metrics(root) == comparable_metrics(smoke_study)


# --- 3. the tracking server is away -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared_repo(tmp_path_factory) -> Path:
    """Three short trials (3 epochs) on prepared data; each test copies it."""
    models = {"vit": {}, "pointnet": {}, "e3nn": {}}
    root = make_study_repo(
        tmp_path_factory.mktemp("outage"),
        {"seeds": [0], "train": {"epochs": 3, "all_families": False}},
        models=models,
    )
    run_command(["dvc", "repro", "prepare_points", "prepare_images"], root)
    return root


@pytest.fixture
def server(tmp_path):
    mlflow_server = MlflowServer(tmp_path / "server.db", tmp_path / "server-artifacts")
    mlflow_server.start()
    yield mlflow_server
    mlflow_server.stop()


def _set_params(root: Path, section: str, **values) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _copy(prepared: Path, tmp_path: Path) -> Path:
    import shutil

    root = tmp_path / "study"
    shutil.copytree(prepared, root, symlinks=True)
    return root


def test_a_tracking_server_that_is_down_stops_the_stage_before_training(prepared_repo, tmp_path):
    root = _copy(prepared_repo, tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"
    began = time.monotonic()
    result = subprocess.run(
        TRAIN_CMD, cwd=root, env=tool_env({"MLFLOW_TRACKING_URI": uri}), capture_output=True, text=True
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert time.monotonic() - began < 60
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"MLFLOW_TRACKING_URI = '{uri}'" in lines[0] and "does not answer" in lines[0], lines[0]
    assert "mlflow server --host 127.0.0.1" in lines[0]
    assert not (root / "data/ray_results").exists() and not (root / "data/train").exists()


def _epochs_per_run(uri: str, parent_id: str) -> dict[str, list[int]]:
    return {r.data.tags["variant"]: _steps(uri, r.info.run_id) for r in _nested_runs(uri, parent_id)}


def test_a_short_tracking_outage_is_retried_without_losing_a_metric(prepared_repo, tmp_path, server, spawn):
    root = _copy(prepared_repo, tmp_path)
    proc = spawn(
        TRAIN_CMD, cwd=root, env=tool_env({"MLFLOW_TRACKING_URI": server.uri}), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    wait_for(lambda: _results(root), 300, proc, "the first trial result")
    server.stop()
    time.sleep(4)
    server.start()
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    assert "unreachable" in output

    study = json.loads((root / "data/train/study.json").read_text())
    epochs = _epochs_per_run(server.uri, study["mlflow"]["parent_run_id"])
    assert epochs == {name: [1, 2, 3] for name in ("vit", "pointnet", "e3nn")}, epochs


def test_a_long_outage_is_reported_at_the_end_and_a_rerun_logs_without_training(
    prepared_repo, tmp_path, server, spawn
):
    root = _copy(prepared_repo, tmp_path)
    _set_params(root, "mlflow", wait_seconds=3)
    env = tool_env({"MLFLOW_TRACKING_URI": server.uri})
    proc = spawn(TRAIN_CMD, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: _results(root), 300, proc, "the first trial result")
    server.stop()
    output, errors = proc.communicate(timeout=600)
    assert proc.returncode == 2, output + errors
    (line,) = errors.strip().splitlines()
    assert "still unreachable" in line and "mlflow.wait_seconds = 3" in line, line
    experiment = _run_state(root)
    assert experiment["status"] == "running"
    assert "run the stage again once the server answers" in line
    assert not (root / "data/train").exists()
    before = _results(root)  # the Tune results stay on disk, every trial complete
    assert len(before) == 3 and all(rows[-1]["epoch"] == 3 for rows in before.values())

    server.start()
    rerun = subprocess.run(TRAIN_CMD, cwd=root, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "3/3 trials had finished and are kept" in rerun.stdout, rerun.stdout
    assert _results(root) == before  # nothing trained again
    epochs = _epochs_per_run(server.uri, experiment["mlflow"]["parent_run_id"])
    assert epochs == {name: [1, 2, 3] for name in ("vit", "pointnet", "e3nn")}, epochs


def test_a_trial_out_of_gpu_memory_fails_with_one_line_in_the_table_and_mlflow(
    prepared_repo, tmp_path, server
):
    """`train.fault.kind: oom` raises what torch raises when the allocator cannot serve a batch."""
    root = _copy(prepared_repo, tmp_path)
    _set_params(
        root, "train", epochs=1, max_failures=0, fault={"model": "pointnet", "epoch": 1, "kind": "oom"}
    )
    result = subprocess.run(
        TRAIN_CMD, cwd=root, env=tool_env({"MLFLOW_TRACKING_URI": server.uri}), capture_output=True, text=True
    )
    assert result.returncode == 2, result.stdout + result.stderr
    line = result.stderr.strip().splitlines()[-1]  # after Ray's own log of the trial's traceback
    assert line.startswith("error: "), result.stderr
    reason = "pointnet: out of GPU memory at batch size"
    assert "1 trial(s) failed" in line and reason in line and "lower the entry's batch_size" in line, line
    table = result.stdout.split("train: failed trials (variant, seed, reason):\n", 1)[1].splitlines()
    assert table[0].startswith("  pointnet  seed 0  ") and reason in table[0], table[0]
    parent_id = line.rsplit("see MLflow run ", 1)[1].strip()
    runs = {r.data.tags["variant"]: r for r in _nested_runs(server.uri, parent_id)}
    assert runs["pointnet"].info.status == "FAILED" and reason in runs["pointnet"].data.tags["error"]
    assert runs["vit"].info.status == "FINISHED" and not runs["vit"].data.tags.get("error")
    assert not (root / "data/train").exists()


# --- 7. safe defaults -------------------------------------------------------------------------------------

LISTENERS = """
import json, pathlib, psutil, ray
from pipeline.config import StudyConfig
from pipeline.training.session import connect_ray
connect_ray(StudyConfig(), pathlib.Path("."))
ray.get(ray.remote(lambda: 1).remote())  # a worker process too
ours = {p.pid for p in psutil.Process().children(recursive=True)} | {psutil.Process().pid}
print(json.dumps(sorted({c.laddr.ip for c in psutil.net_connections("inet")
                         if c.status == "LISTEN" and c.pid in ours})))
ray.shutdown()
"""


def test_the_ray_instance_the_stage_starts_listens_on_loopback_only():
    result = subprocess.run(
        [sys.executable, "-c", LISTENERS],
        cwd=REPO,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    addresses = json.loads(result.stdout.strip().splitlines()[-1])
    assert addresses, "no listening sockets found"
    assert set(addresses) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, addresses


def test_a_tune_run_others_can_write_is_not_restored(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.training.session import check_trusted

    experiment = tmp_path / "train-abc"
    experiment.mkdir()
    (experiment / "tuner.pkl").write_bytes(b"not read")
    check_trusted(experiment)  # this user's, not writable by others: fine
    experiment.chmod(0o777)
    with pytest.raises(ConfigError, match="not restoring a Tune run"):
        check_trusted(experiment)
