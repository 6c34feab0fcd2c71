"""benchmarks.screen: one variant (points, images or the proximity task) with changed settings, trained as a
trial, on tiny data."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import torch

from benchmarks.screen import prepare_missing, prepared_folder, preparing, rotated_accuracy, screened_config
from pipeline.config import ConfigError
from tests.conftest import REPO


def test_a_screen_trains_the_variant_with_its_settings_and_reports_its_test_accuracy(params, tmp_path):
    out = tmp_path / "screen.jsonl"
    command = [sys.executable, "-m", "benchmarks.screen", "pointnet-so3", "--params", str(params)]
    command += ["--set", "epochs=3", "--set", "dim=16", "--json", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["variant"] == "pointnet-so3"
    assert result["settings"] == {"epochs": 3, "dim": 16}
    assert len(result["val_curve"]) == 3  # the epochs it was given, not params.yaml's
    assert result["best_val_accuracy"] == max(result["val_curve"])
    assert len(result["train_loss"]) == 3 and all(loss > 0 for loss in result["train_loss"])
    assert f"train loss {result['train_loss'][-1]:.3f}" in done.stdout  # each epoch's line says it
    test_count = 4 * 2  # classes x test_per_class of TINY_PARAMS
    wrong = round((1 - result["test_accuracy"]) * test_count)
    assert sum(result["confusions"].values()) == wrong
    assert "test" in done.stdout.splitlines()[-2]
    rotated = result["rotated_test_accuracy"]  # a point model: also under the evaluate stage's rotations
    assert set(rotated) == {"z", "so3"} and all(0 <= a <= 1 for a in rotated.values())
    assert f"{100 * rotated['so3']:.1f}% under SO(3)" in done.stdout.splitlines()[-2]


def test_an_equivariant_screen_scores_the_same_under_rotation(params, tmp_path):
    """The rotated test clouds are the unrotated ones turned, at the same points: e3nn's answers stay."""
    out = tmp_path / "screen.jsonl"
    command = [sys.executable, "-m", "benchmarks.screen", "e3nn", "--params", str(params)]
    command += ["--set", "epochs=2", "--json", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    e3nn = json.loads(out.read_text())
    assert e3nn["rotated_test_accuracy"] == {"z": e3nn["test_accuracy"], "so3": e3nn["test_accuracy"]}


@pytest.mark.parametrize(
    ("variant", "dataset", "test_count"),
    [("vit-none", "images", 4 * 2), ("proximity_mamba-hilbert", "proximity", 12)],  # TINY_PARAMS' test sets
)
def test_an_image_or_proximity_screen_prepares_its_data_once_and_tests_in_distribution(
    params, tmp_path, variant, dataset, test_count
):
    data, out = tmp_path / "data", tmp_path / "screen.jsonl"
    command = [sys.executable, "-m", "benchmarks.screen", variant, "--params", str(params)]
    command += ["--data", str(data), "--set", "epochs=2", "--json", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (data / dataset / "manifest.json").is_file()  # kept in --data for the next screen
    assert not (data / "proximity").exists() or dataset == "proximity"  # only what the variant needs
    prepared = (data / dataset / "manifest.json").stat().st_mtime_ns
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert (data / dataset / "manifest.json").stat().st_mtime_ns == prepared  # reused, not prepared again
    first, second = (json.loads(line) for line in out.read_text().splitlines())
    assert first["val_curve"] == second["val_curve"] and len(first["val_curve"]) == 2  # same data, same seed
    wrong = round((1 - first["test_accuracy"]) * test_count)
    assert sum(first["confusions"].values()) == wrong  # every test image of the in-distribution set counted


def test_a_screen_started_beside_another_waits_for_its_data_and_reuses_them(params, tmp_path, capsys):
    """Two screens on one fresh `--data` prepared it twice at once (and, before the stages' writer spared a
    running writer's folder, the second died with FileNotFoundError)."""
    config, _ = screened_config(params, "vit-none", {})
    data = tmp_path / "data"
    returned: list = []
    with preparing(data):  # the first screen, preparing
        second = threading.Thread(
            target=lambda: returned.append(prepared_folder(config, "images", data, REPO))
        )
        second.start()
        second.join(timeout=2)
        assert second.is_alive() and not (data / "points").exists()  # it waits, and writes nothing
        assert f"another screen is preparing the data in {data}; waiting" in capsys.readouterr().out
        prepared = prepare_missing(config, "images", data, REPO)  # the first screen's own preparation
        stamps = {kind: (data / kind / "manifest.json").stat().st_mtime_ns for kind in ("points", "images")}
    second.join(timeout=60)
    assert returned == [prepared]
    assert {kind: (data / kind / "manifest.json").stat().st_mtime_ns for kind in stamps} == stamps  # reused


@pytest.mark.parametrize(
    ("variant", "settings", "named"),
    [
        ("dgcnn", {"bogus": 1}, "DGCNNConfig.bogus: unknown hparam"),
        ("dgcnn", {"epochs": 0}, "train.models.dgcnn.epochs = 0"),
        ("e3nn", {"lmax": 9}, "E3nnConfig.lmax = 9"),
        ("pointnet-so3", {"augment": "z"}, "train.models.pointnet.augment is a grid"),
        ("vit-learned", {"augment": "z"}, "train.models.vit.augment: only point models take it"),
        ("nope", {}, "variant 'nope' is not in train.models"),
    ],
)
def test_bad_settings_get_one_line_naming_them_before_any_work(params, variant, settings, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")) as caught:
        screened_config(params, variant, settings)
    assert "\n" not in str(caught.value)


def test_the_cli_stops_on_bad_settings_and_writes_nothing(params, tmp_path):
    out = tmp_path / "screen.jsonl"
    command = [sys.executable, "-m", "benchmarks.screen", "e3nn", "--params", str(params)]
    command += ["--set", "lmax=9", "--json", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "lmax = 9" in done.stderr
    assert not out.exists()


class _UpOrDown(torch.nn.Module):
    """Class 1 where a cloud's mean height is above zero: blind to turns about z, not to other rotations."""

    def forward(self, clouds: torch.Tensor) -> torch.Tensor:  # [B, P, 3] -> logits [B, 2]
        up = clouds[..., 2].mean(dim=1)
        return torch.stack([-up, up], dim=1)


def test_the_rotated_accuracy_turns_the_test_clouds_as_the_evaluate_stage_does(params):
    config, _ = screened_config(params, "pointnet-none", {})
    generator = torch.Generator().manual_seed(0)
    clouds = torch.randn(64, 32, 3, generator=generator) + torch.tensor([0.0, 0.0, 1.0])
    clouds[32:, :, 2] -= 2.0  # half above the floor, half below
    labels = (torch.arange(64) < 32).long()
    rotated = rotated_accuracy(_UpOrDown(), clouds, labels, config)
    assert rotated["z"] == 1.0  # a turn about z keeps every height
    assert 0.2 < rotated["so3"] < 0.8  # anywhere in SO(3): the height is a coin toss
