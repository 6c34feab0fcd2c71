"""The train stage on a real two-node Ray cluster on this machine (two raylets), through `dvc repro`; a node
that dies mid-trial."""

from __future__ import annotations

import contextlib
import csv
import json
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import make_study_repo, run_command, tool_env

pytestmark = pytest.mark.slow

# Four short trials, one CPU each, on two one-CPU nodes: the scheduler must use both nodes.
MODELS = {"vit": {}, "pointnet": {"augment": {"grid": ["none", "so3"]}}, "e3nn": {}}


@pytest.fixture
def two_node_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def test_the_train_stage_runs_its_trials_across_the_nodes_of_an_existing_cluster(tmp_path, two_node_cluster):
    override = {"seeds": [0], "train": {"cpus_per_trial": 1, "all_families": False}}
    root = make_study_repo(tmp_path, override, models=MODELS)
    result = run_command(["dvc", "repro"], root, env={"RAY_ADDRESS": two_node_cluster.address})
    assert "7/7" not in result.stdout and "4/4 done" in result.stdout

    with open(root / "data/train/trials.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and all(r["status"] == "TERMINATED" for r in rows)
    node_ids = {r["node_id"] for r in rows}
    cluster_nodes = {node.node_id for node in two_node_cluster.list_all_nodes()}
    assert node_ids <= cluster_nodes
    assert len(node_ids) == 2, f"trials ran on {node_ids}, expected both nodes"


# Two trials of five epochs, about half a second an epoch here (e3nn and DGCNN, 128 clouds of 128 points):
# long enough to kill a node mid-epoch after a trial's first checkpoint and before its last epoch, short
# enough for CI.
EPOCHS = 5
SLOW_TRIALS = {
    "seeds": [0],
    "points": {"train_per_class": 32, "num_points": 128},
    "train": {
        "cpus_per_trial": 1,
        "all_families": False,
        "epochs": EPOCHS,
        "points_per_cloud": 128,
        "max_failures": 2,
    },
}
SLOW_MODELS = {"e3nn": {}, "dgcnn": {}}


def _reported(root: Path) -> dict[str, list[dict]]:
    """What every trial reported so far, by trial folder (one JSON object a line; a retry appends)."""
    reported = {}
    for path in root.glob("data/ray_results/*/*/result.json"):
        lines = path.read_text().split("\n")[:-1]  # the last line may be half written
        reported[path.parent.name] = [json.loads(line) for line in lines]
    return reported


def _processes_of(node) -> list[psutil.Process]:
    """A node's raylet and all it started: its agents and workers (the trials among them)."""
    own = [psutil.Process(popen.pid) for _, popen in node.live_processes()]
    return own + [child for process in own for child in process.children(recursive=True)]


def _still_running(processes: list[psutil.Process]) -> list[psutil.Process]:
    running = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):  # a zombie is dead, only not yet reaped
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
    return running


def test_a_trial_whose_node_dies_resumes_from_its_checkpoint_on_the_surviving_node(
    tmp_path, two_node_cluster, spawn
):
    root = make_study_repo(tmp_path, SLOW_TRIALS, models=SLOW_MODELS)
    run_command(["dvc", "repro", "prepare_points", "prepare_images"], root)  # the timing is the training's
    worker = next(iter(two_node_cluster.worker_nodes))
    head_id = two_node_cluster.head_node.node_id
    env = tool_env({"RAY_ADDRESS": two_node_cluster.address})
    log = tmp_path / "repro.log"  # a file, not a pipe: a pipe nobody reads while we poll would fill and block
    with open(log, "w") as out:  # dvc and the Tune driver under it: killed when the test ends (`spawn`)
        study = spawn(["dvc", "repro", "train"], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    # A trial on the worker node with a checkpoint (epoch >= 1) and epochs still to go, in the middle of
    # its next epoch: kill the node. Tune logs a result, then fetches its checkpoint in a second round
    # trip to the trial; a node lost between the two loses that checkpoint, and the retry redoes the
    # epoch. Killing a fifth to three fifths of an epoch after the last report keeps clear of that window
    # (milliseconds) and of the next report.
    deadline, victim = time.monotonic() + 300, None
    while victim is None:
        assert study.poll() is None, f"dvc repro ended before a trial ran on the worker:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no trial reached epoch 1 on the worker: {_reported(root)}"
        time.sleep(0.02)
        for folder, results in _reported(root).items():
            last = results[-1] if results else {}
            if last.get("node_id") == worker.node_id and 1 <= last["epoch"] < EPOCHS:
                if 0.2 <= (time.time() - last["reported_at"]) / last["epoch_seconds"] <= 0.6:
                    victim, before_kill = folder, last
    doomed = {process.pid: process for process in _processes_of(worker)}
    assert before_kill["pid"] in doomed, f"trial process {before_kill['pid']} is not the worker node's"
    assert _reported(root)[victim][-1]["epoch"] == before_kill["epoch"], "the trial reported again meanwhile"
    # A dead host takes its workers at once. remove_node kills the raylet and leaves its workers to notice
    # (2 s here), and until then the driver still gets the trial's results: kill the trial first.
    doomed[before_kill["pid"]].kill()
    two_node_cluster.remove_node(worker, allow_graceful=False)
    assert study.wait(timeout=600) == 0, log.read_text()

    # Nothing of the dead node runs on: its agents and idle workers went with its raylet.
    assert not _still_running(list(doomed.values()))
    with open(root / "data/train/trials.csv") as handle:
        rows = {row["trial_id"]: row for row in csv.DictReader(handle)}
    assert all(row["status"] == "TERMINATED" for row in rows.values()), rows
    moved = rows[before_kill["trial_id"]]
    assert int(moved["retries"]) >= 1 and moved["node_id"] == head_id, moved
    for name in SLOW_MODELS:
        assert (root / f"data/train/models/{name}/seed-0.pt").is_file()

    # Every epoch reported once: the retry went on from the last checkpoint, not from epoch 1.
    results = _reported(root)[victim]
    assert [r["epoch"] for r in results] == list(range(1, EPOCHS + 1)), results
    resumed = next(r for r in results if r["retries"] >= 1)
    assert resumed["epoch"] > before_kill["epoch"] and resumed["node_id"] == head_id, resumed
