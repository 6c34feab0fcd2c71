"""benchmarks.gpu_check on a machine without CUDA: it stops with one line, and its study part is set up
right (the shrunk GPU profile is valid; the scratch copy has the code and none of the outputs)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from benchmarks.gpu_check import scratch_copy, shrunk_gpu_params
from pipeline.config import parse_config
from tests.conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the check itself")
def test_without_cuda_it_stops_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "no CUDA device" in line and "GPU machine" in line
    assert not out.exists()


@pytest.mark.parametrize("quick", [True, False])
def test_the_shrunk_gpu_study_is_a_valid_params_file(quick):
    params = shrunk_gpu_params(quick, gpus_per_trial=0)  # 0.5 is refused where there is no CUDA
    config = parse_config(params, REPO)
    assert config.seeds == (0,) and config.train.epochs == (1 if quick else 2)
    assert config.images.train_resolution == 224 and config.train.size == "small"  # the profile's sizes
    assert shrunk_gpu_params(quick)["train"]["gpus_per_trial"] == 0.5  # two trials share the GPU


def test_the_scratch_copy_has_the_code_and_no_outputs(tmp_path):
    root = scratch_copy(tmp_path / "study")
    assert (root / "perception/data/canvas.py").is_file()  # a package folder named like the outputs
    assert (root / "dvc.yaml").is_file() and (root / "profiles/gpu.yaml").is_file()
    assert not (root / "dvc.lock").exists() and not (root / "metrics").exists()
    assert not (root / "data/prepared").exists() and (root / "data/raw").is_dir()
    assert (root / ".dvc/config").read_text() == (REPO / ".dvc/config").read_text()
    status = subprocess.run(["dvc", "status"], cwd=root, capture_output=True, text=True)
    assert status.returncode == 0 and "prepare_points" in status.stdout, status.stdout + status.stderr
