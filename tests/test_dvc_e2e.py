"""The data stages through a real `dvc repro` (targeted at them), in a temporary copy of the repository."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_study_repo, merge, run_command, write_params

pytestmark = pytest.mark.slow


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    return make_study_repo(tmp_path)


def _out_hashes(root: Path) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage["outs"]}


def test_dvc_repro_runs_the_data_stages_reproducibly(repo_copy):
    dag = run_command(["dvc", "dag"], repo_copy).stdout
    assert "prepare_points" in dag and "prepare_images" in dag

    run_command(["dvc", "repro", "prepare_images"], repo_copy)
    assert (repo_copy / "data/prepared/points/train_points.npy").is_file()
    assert (repo_copy / "data/prepared/images/test_fov_r24.npy").is_file()
    first = _out_hashes(repo_copy)
    assert set(first) == {"data/prepared/points", "data/prepared/images"}

    run_command(["dvc", "repro", "-f", "prepare_images"], repo_copy)
    assert _out_hashes(repo_copy) == first  # same params, same bytes

    again = run_command(["dvc", "repro", "prepare_images"], repo_copy)
    assert "Running stage" not in again.stdout  # nothing changed, nothing runs

    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    write_params(repo_copy / "params.yaml", merge(params, {"images": {"eval_resolutions": [32]}}))
    partial = run_command(["dvc", "repro", "prepare_images"], repo_copy)
    assert "Running stage 'prepare_images'" in partial.stdout
    assert "Running stage 'prepare_points'" not in partial.stdout


def test_the_reports_retime_command_reruns_only_evaluate_and_report(repo_copy):
    """The decision table's caveat tells a user to time the models again on the robot: the command it gives
    must not train them again (`dvc repro -f evaluate report` ran every stage from prepare_points on)."""
    from pipeline.evaluation.decision import RETIME_COMMAND

    dry = run_command([*RETIME_COMMAND.split(), "--dry"], repo_copy).stdout
    assert re.findall(r"Running stage '(\w+)'", dry) == ["evaluate", "report"]


def test_dvc_repro_with_a_bad_param_fails_fast_naming_the_key(repo_copy):
    run_command(["dvc", "repro", "prepare_images"], repo_copy)
    lock_before = (repo_copy / "dvc.lock").read_text()
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    write_params(repo_copy / "params.yaml", merge(params, {"points": {"num_points": -5}}))
    result = run_command(["dvc", "repro", "prepare_images"], repo_copy, check=False)
    assert result.returncode != 0
    assert "error: params.yaml: points.num_points = -5 is not allowed" in result.stdout + result.stderr
    assert (repo_copy / "dvc.lock").read_text() == lock_before
    assert not list((repo_copy / "data/prepared").glob(".*.tmp-*"))


def test_the_whole_study_on_a_scanobjectnn_layout_dataset(tmp_path):
    """`dvc exp run -S points.source=scanobjectnn -S points.root=...` and nothing else: prepare, train,
    evaluate and report on a tiny ScanObjectNN-layout HDF5 dataset, its images rendered from points."""
    from tests.point_fixtures import scanobjectnn_h5

    models = {
        "vit": {"pos_embed": {"grid": ["learned", "none"]}},
        "pointnet": {"augment": {"grid": ["none", "so3"]}},
    }
    repo = make_study_repo(tmp_path, {"seeds": [0], "train": {"all_families": False}}, models=models)
    scanobjectnn_h5(repo / "data/raw/h5_files", {"train": 30, "test": 15})
    run_command(["git", "add", "-A"], repo)
    run_command(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "study"], repo)
    source = ["-S", "points.source=scanobjectnn", "-S", "points.root=data/raw/h5_files"]
    run = run_command(["dvc", "exp", "run", *source, "-S", "points.up_axis=y", "-n", "sonn"], repo)
    assert "(scanobjectnn), 15 classes" in run.stdout and "images from points" in run.stdout

    manifest = yaml.safe_load((repo / "data/prepared/points/manifest.json").read_text())
    assert set(manifest["source_files"]) == {
        "main_split/training_objectdataset.h5", "main_split/test_objectdataset.h5"
    }  # fmt: skip
    report = (repo / "reports/report.md").read_text()
    assert "pointnet-none" in report and "pointnet-so3" in report  # the rotation table, on this data
    assert "vit-learned" in report and "(b)" in report  # the resolution experiment, on this data
    verdicts = {v["claim"]: v for v in json.loads((repo / "reports/verdicts.json").read_text())["claims"]}
    for claim in (2, 4):  # decided, or inconclusive with the gate naming the models
        v = verdicts[claim]
        assert v["verdict"] != "inconclusive" or v["excluded"] or v["effect"] is None, v

    # MLflow's datasets carry the prepared data's digest, and the parent run the source files' digest.
    from mlflow import MlflowClient

    study = json.loads((repo / "data/train/study.json").read_text())
    client = MlflowClient(tracking_uri=study["mlflow"]["tracking_uri"])
    parent = client.get_run(study["mlflow"]["parent_run_id"])
    assert parent.data.tags["dataset.points.source"] == "scanobjectnn obj_bg, data/raw/h5_files"
    assert parent.data.tags["dataset.points.source_sha256"] == manifest["source_sha256"]
    digests = {d.dataset.digest for d in parent.inputs.dataset_inputs if d.dataset.name.startswith("points")}
    assert digests and all(manifest_sha(repo)[: len(d)] == d for d in digests)


def manifest_sha(repo: Path) -> str:
    from perception.data.arrays import sha256_file

    return sha256_file(repo / "data/prepared/points/manifest.json")
