"""The data stages through a real `dvc repro` (targeted at them), in a temporary copy of the repository."""

from __future__ import annotations

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
