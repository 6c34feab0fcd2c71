"""Rotation evaluation: seeded rotation draws, geodesic angles, accuracy per mode and angle, invariance."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor, nn

from perception.evaluation.rotation import (
    NUM_BINS,
    RotationResult,
    _angle_bins,
    evaluate_rotations,
    invariance_error,
)
from perception.models import build
from perception.precision import default_dtype
from perception.rotations import MODES, geodesic_angle_deg, rotation_draws, rotations_about_z

NUM_CLOUDS, NUM_POINTS = 6, 64


def _clouds(seed: int = 0) -> Tensor:
    """float32[6, 64, 3] in the unit cube, alternately shifted up and down so the mean z is far from 0."""
    generator = torch.Generator().manual_seed(seed)
    points = torch.rand(NUM_CLOUDS, NUM_POINTS, 3, generator=generator) * 2 - 1
    shift = torch.tensor([0.6, -0.6]).repeat(NUM_CLOUDS // 2)  # [6]
    points[..., 2] += shift[:, None]
    return points


class NormModel(nn.Module):
    """Logits from the mean distance to the origin only: exactly what rotations preserve."""

    def forward(self, x: Tensor) -> Tensor:
        radius = x.norm(dim=-1).mean(dim=1, keepdim=True)  # [B, 1]
        centres = torch.tensor([0.6, 0.9, 1.2], dtype=x.dtype)  # [3]
        return -((radius - centres) ** 2)  # [B, 3]: nearest centre wins


class ZSignModel(nn.Module):
    """Class 1 when the cloud's mean z is positive, else 0: kept by rotations about z, not by SO(3)."""

    def forward(self, x: Tensor) -> Tensor:
        z = x[..., 2].mean(dim=1)  # [B]
        return torch.stack([-z, z], dim=1)  # [B, 2]


@pytest.mark.parametrize("mode", MODES)
def test_rotations_are_proper(mode: str) -> None:
    rotations = rotation_draws(50, 3, mode, seed=1)
    assert rotations.shape == (3, 50, 3, 3) and rotations.dtype == torch.float64
    eye = torch.eye(3, dtype=torch.float64).expand_as(rotations)
    torch.testing.assert_close(rotations @ rotations.transpose(-1, -2), eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rotations), torch.ones(3, 50, dtype=torch.float64))


def test_none_is_identity_and_z_keeps_the_z_coordinate() -> None:
    assert torch.equal(
        rotation_draws(4, 2, "none", seed=0), torch.eye(3, dtype=torch.float64).expand(2, 4, 3, 3)
    )
    points = torch.randn(4, 10, 3, dtype=torch.float64)
    for rotation in rotation_draws(4, 5, "z", seed=3):  # [4, 3, 3]
        rotated = points @ rotation.transpose(-1, -2)
        assert torch.equal(rotated[..., 2], points[..., 2])
        torch.testing.assert_close(rotated.norm(dim=-1), points.norm(dim=-1))


@pytest.mark.parametrize("mode", ["z", "so3"])
def test_draws_are_deterministic_per_seed(mode: str) -> None:
    first = rotation_draws(8, 3, mode, seed=5)
    assert torch.equal(first, rotation_draws(8, 3, mode, seed=5))
    assert not torch.equal(first, rotation_draws(8, 3, mode, seed=6))


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"'xyz'.*none, z, so3"):
        rotation_draws(2, 1, "xyz", seed=0)
    with pytest.raises(ValueError, match="'SO3'"):
        evaluate_rotations(NormModel(), _clouds(), torch.zeros(NUM_CLOUDS, dtype=torch.long), modes=("SO3",))


def test_geodesic_angle_of_rotations_about_z() -> None:
    degrees = torch.tensor([0.0, 10.0, 45.0, 90.0, 135.0, 179.0, 180.0], dtype=torch.float64)
    angles = geodesic_angle_deg(rotations_about_z(torch.deg2rad(degrees)))
    torch.testing.assert_close(angles, degrees, atol=1e-5, rtol=0)  # arccos is ill-conditioned near 0, 180
    assert angles[0] == 0.0 and angles[-1] == 180.0


def test_haar_angles_follow_one_minus_cos_density() -> None:
    # Haar SO(3): angle density (1 - cos t) / pi on [0, pi], CDF (t - sin t) / pi,
    # mean pi/2 + 2/pi (126.5 degrees).
    angles = geodesic_angle_deg(rotation_draws(20000, 1, "so3", seed=0)).reshape(-1)
    expected_mean = math.degrees(math.pi / 2 + 2 / math.pi)
    assert abs(float(angles.mean()) - expected_mean) < 3.0
    edges = torch.linspace(0, math.pi, NUM_BINS + 1, dtype=torch.float64)
    expected = torch.diff((edges - torch.sin(edges)) / math.pi)  # [12] probability per 15-degree bin
    observed = torch.histc(angles, bins=NUM_BINS, min=0, max=180) / len(angles)
    torch.testing.assert_close(observed, expected, atol=0.015, rtol=0)


def test_angle_bins_edges() -> None:
    angles = torch.tensor([0.0, 14.999, 15.0, 90.0, 179.9, 180.0], dtype=torch.float64)
    correct = torch.tensor([True, False, True, True, False, True])
    bins = _angle_bins(angles, correct)
    assert [b.count for b in bins] == [2, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 2]
    assert bins[0].accuracy == 0.5 and bins[1].accuracy == 1.0 and bins[11].accuracy == 0.5
    assert math.isnan(bins[2].accuracy)


def test_norm_model_scores_the_same_in_every_mode() -> None:
    points = _clouds()
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    model = NormModel().train()
    results = evaluate_rotations(model, points, labels, draws=3, seed=2)
    assert model.training  # the caller's mode comes back
    assert set(results) == set(MODES)
    accuracies = {mode: result.accuracy for mode, result in results.items()}
    assert len(set(accuracies.values())) == 1, accuracies
    for result in results.values():
        assert result.accuracy_std == 0.0
    assert len(results["none"].draw_accuracies) == 1 and len(results["so3"].draw_accuracies) == 3


def test_z_sign_model_is_robust_to_z_but_not_so3() -> None:
    points = _clouds()
    labels = torch.tensor([1, 0, 1, 0, 1, 0])  # the upward-shifted clouds are class 1
    results = evaluate_rotations(ZSignModel(), points, labels, draws=4, seed=0)
    assert results["none"].accuracy == 1.0
    assert results["z"].draw_accuracies == (1.0,) * 4 and results["z"].accuracy_std == 0.0
    assert results["so3"].accuracy < 1.0 and results["so3"].accuracy_std > 0.0


@pytest.mark.parametrize("draws", [1, 3])
def test_angle_bins_pool_every_sample_and_draw(draws: int) -> None:
    points = _clouds()
    labels = torch.tensor([1, 0, 1, 0, 1, 0])
    results = evaluate_rotations(ZSignModel(), points, labels, modes=("z", "so3"), draws=draws)
    for result in results.values():
        bins = result.angle_bins
        assert len(bins) == NUM_BINS and bins[0].low_deg == 0.0 and bins[-1].high_deg == 180.0
        assert all(a.high_deg == b.low_deg for a, b in zip(bins[:-1], bins[1:], strict=True))
        assert sum(b.count for b in bins) == NUM_CLOUDS * draws
        hits = sum(b.accuracy * b.count for b in bins if b.count)
        assert hits == pytest.approx(result.accuracy * NUM_CLOUDS * draws)
        if draws == 1:
            assert result.accuracy_std == 0.0


def test_pointnet_evaluates_and_serialises() -> None:
    torch.manual_seed(0)
    model = build("pointnet", num_classes=3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    results = evaluate_rotations(model, _clouds(), labels, draws=2, batch_size=4)
    for result in results.values():
        assert isinstance(result, RotationResult)
        assert 0.0 <= result.accuracy <= 1.0
        text = json.dumps(result.as_dict())
        assert json.dumps(json.loads(text)) == text  # NaN survives as NaN
        assert json.loads(text)["angle_bins"][0].keys() == {"low_deg", "high_deg", "accuracy", "count"}


def test_invariance_error_separates_e3nn_from_pointnet() -> None:
    points = _clouds()
    torch.manual_seed(0)
    # e3nn computes its constants in the default dtype at construction: build in float64 for ~1e-15 errors.
    with default_dtype(torch.float64):
        e3nn = build("e3nn", num_classes=3)
    pointnet = build("pointnet", num_classes=3)
    before = {k: v.clone() for k, v in pointnet.state_dict().items()}
    assert invariance_error(e3nn, points, rotations=3) < 1e-9
    assert invariance_error(pointnet, points, rotations=3) > 1e-3
    # The caller's model is untouched: still float32, same weights.
    assert all(torch.equal(before[k], v) for k, v in pointnet.state_dict().items())
    assert next(pointnet.parameters()).dtype == torch.float32
