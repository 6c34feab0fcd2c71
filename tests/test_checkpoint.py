"""Checkpoints: `{format, family, config, state_dict, training, metrics}`, rebuilt by perception alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perception.models import FAMILIES, build
from perception.models.checkpoint import (
    CheckpointError,
    ModelCheckpoint,
    load_checkpoint,
    model_config,
    save_checkpoint,
)
from tests.conftest import REPO

INPUTS = {"image": torch.randn(2, 4, 32, 32), "points": torch.randn(2, 64, 3)}


def _saved(tmp_path: Path, family: str) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = build(family, num_classes=5).eval()
    path = tmp_path / f"{family}.pt"
    training = {"variant": family, "seed": 0, "dataset": "points", "lr": 1e-3}
    save_checkpoint(
        path, ModelCheckpoint(family, model_config(model), model.state_dict(), training, {"epoch": 3})
    )
    return path, model


@pytest.mark.parametrize("family", FAMILIES)
def test_a_checkpoint_rebuilds_the_same_function(tmp_path: Path, family: str) -> None:
    path, model = _saved(tmp_path, family)
    saved = load_checkpoint(path)
    assert saved.family == family and saved.metrics == {"epoch": 3} and saved.training["lr"] == 1e-3
    assert saved.config == model_config(model) and saved.config["num_classes"] == 5
    inputs = INPUTS[FAMILIES[family].input_kind]
    with torch.no_grad():
        assert torch.equal(saved.build()(inputs), model(inputs))


def test_the_round_trip_imports_nothing_from_the_pipeline(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path, "mamba_hybrid")
    script = (
        "import sys, torch\n"
        "from perception.models.checkpoint import load_checkpoint\n"
        f"model = load_checkpoint({str(path)!r}).build()\n"
        "assert model(torch.randn(1, 4, 32, 32)).shape == (1, 5)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'pipeline', 'ray', 'mlflow', 'dvc'}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_an_old_checkpoint_fails_with_one_line_that_says_to_retrain(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    flat = {"trial.family": "pointnet", "trial.size": "tiny", "data.num_classes": 5}
    torch.save({"state_dict": build("pointnet", num_classes=5).state_dict(), "config": flat}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: not a usable checkpoint")
    assert "an older checkpoint" in message and "retrain" in message


def test_an_unregistered_family_is_refused_naming_the_registered_ones(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"format": 2, "family": "resnet", "config": {}, "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="family 'resnet' is not registered; allowed: vit, "):
        load_checkpoint(path)


def test_the_float64_rebuild_keeps_the_trained_values_and_restores_the_default_dtype(tmp_path: Path) -> None:
    from perception.models.checkpoint import build_float64
    from perception.precision import default_dtype

    path, model = _saved(tmp_path, "e3nn")
    wide = build_float64(load_checkpoint(path))
    assert torch.get_default_dtype() == torch.float32
    assert all(p.dtype == torch.float64 for p in wide.parameters())
    clouds = torch.randn(2, 64, 3)
    with torch.no_grad():
        assert torch.allclose(wide(clouds.double()).float(), model(clouds), atol=1e-4)
    with pytest.raises(RuntimeError), default_dtype(torch.float64):
        raise RuntimeError("inside")
    assert torch.get_default_dtype() == torch.float32
