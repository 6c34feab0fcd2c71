"""The train stage on a real two-node Ray cluster on this machine (two raylets), through `dvc repro`."""

from __future__ import annotations

import csv

import pytest

from tests.conftest import make_study_repo, run_command

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
    root = make_study_repo(tmp_path, {"train": {"cpus_per_trial": 1, "all_families": False}}, models=MODELS)
    result = run_command(["dvc", "repro"], root, env={"RAY_ADDRESS": two_node_cluster.address})
    assert "7/7" not in result.stdout and "4/4 done" in result.stdout

    with open(root / "data/train/trials.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and all(r["status"] == "TERMINATED" for r in rows)
    node_ids = {r["node_id"] for r in rows}
    cluster_nodes = {node.node_id for node in two_node_cluster.list_all_nodes()}
    assert node_ids <= cluster_nodes
    assert len(node_ids) == 2, f"trials ran on {node_ids}, expected both nodes"
