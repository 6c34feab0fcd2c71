"""The data stages through a real `dvc repro`, in a temporary copy of the repository, on tiny params."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY_PARAMS, merge, write_params

pytestmark = pytest.mark.slow

COPIED = ["pipeline", "perception", "dvc.yaml", ".dvcignore", ".gitignore", "data/raw/README.md"]


def _run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    root = tmp_path / "study"
    for rel in COPIED:
        src, dst = REPO / rel, root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    # The real params file, shrunk: dvc.yaml templates read keys from it (e.g. ${points.root}).
    real = yaml.safe_load((REPO / "params.yaml").read_text())
    write_params(root / "params.yaml", merge(merge(real, TINY_PARAMS), {"runtime": {"workers": 2}}))
    _run(["git", "init", "-q"], root)
    _run(["dvc", "init", "-q"], root)
    _run(["dvc", "config", "core.analytics", "false"], root)
    return root


def _out_hashes(root: Path) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage["outs"]}


def test_dvc_repro_runs_the_data_stages_reproducibly(repo_copy):
    dag = _run(["dvc", "dag"], repo_copy).stdout
    assert "prepare_points" in dag and "prepare_images" in dag

    _run(["dvc", "repro"], repo_copy)
    assert (repo_copy / "data/prepared/points/train_points.npy").is_file()
    assert (repo_copy / "data/prepared/images/test_r24.npy").is_file()
    first = _out_hashes(repo_copy)
    assert set(first) == {"data/prepared/points", "data/prepared/images"}

    _run(["dvc", "repro", "-f"], repo_copy)
    assert _out_hashes(repo_copy) == first  # same params, same bytes

    again = _run(["dvc", "repro"], repo_copy)
    assert "Running stage" not in again.stdout  # nothing changed, nothing runs

    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    write_params(repo_copy / "params.yaml", merge(params, {"images": {"eval_resolutions": [16, 32]}}))
    partial = _run(["dvc", "repro"], repo_copy)
    assert "Running stage 'prepare_images'" in partial.stdout
    assert "Running stage 'prepare_points'" not in partial.stdout


def test_dvc_repro_with_a_bad_param_fails_fast_naming_the_key(repo_copy):
    _run(["dvc", "repro"], repo_copy)
    lock_before = (repo_copy / "dvc.lock").read_text()
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    write_params(repo_copy / "params.yaml", merge(params, {"points": {"num_points": -5}}))
    result = _run(["dvc", "repro"], repo_copy, check=False)
    assert result.returncode != 0
    assert "error: params.yaml: points.num_points = -5 is not allowed" in result.stdout + result.stderr
    assert (repo_copy / "dvc.lock").read_text() == lock_before
    assert not list((repo_copy / "data/prepared").glob(".*.tmp-*"))
