"""benchmarks.gpu_check on a machine without CUDA: it stops with one line, and its study part is set up
right (the shrunk GPU profile is valid; the scratch copy has the code and none of the outputs)."""

from __future__ import annotations

import os
import re
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


# What the GPU machine lacks (../shared/NOTES.md): the check must import and collect its tests without them.
_MISSING_ON_THE_GPU_MACHINE = ("ray", "mlflow", "dvc", "open3d", "trimesh", "pydantic")

_BLOCKED_RUN = """
import importlib.abc, importlib.machinery, sys

MISSING = set(sys.argv[1].split(","))


class Missing(importlib.abc.Loader):
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)

    def exec_module(self, module):
        pass


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in MISSING:
            return importlib.machinery.ModuleSpec(name, Missing())
        return None


sys.meta_path.insert(0, Block())
import perception.models, perception.ops.scan, benchmarks.gpu_check  # noqa: E401
import pytest

files = benchmarks.gpu_check.gpu_test_files()
print("files:", " ".join(files))
code = pytest.main(["--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files])
print("loaded:", sorted(m for m in MISSING if m in sys.modules))
sys.exit(int(code))
"""


def test_the_check_and_its_gpu_tests_need_only_torch_triton_e3nn_and_pyg():
    result = subprocess.run(
        [sys.executable, "-c", _BLOCKED_RUN, ",".join(_MISSING_ON_THE_GPU_MACHINE)],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    files = out.split("files:", 1)[1].splitlines()[0].split()
    assert {"tests/test_scan.py", "tests/test_scan_triton.py", "tests/test_training_loop.py"} <= set(files)
    collected = int(re.search(r"(\d+)/\d+ tests collected", out).group(1))
    assert collected >= 10, out[-2000:]  # every gpu test, none lost to an import error
    assert "loaded: []" in out


def test_the_blocker_really_blocks(tmp_path):
    """The run above would prove nothing if the missing packages still imported."""
    head = _BLOCKED_RUN.split("sys.meta_path.insert(0, Block())")[0]
    probe = head + "sys.meta_path.insert(0, Block())\n"
    probe += "try:\n    import pydantic\nexcept ImportError:\n    print('blocked')\n"
    result = subprocess.run([sys.executable, "-c", probe, "pydantic"], capture_output=True, text=True)
    assert result.stdout.strip() == "blocked", result.stdout + result.stderr
