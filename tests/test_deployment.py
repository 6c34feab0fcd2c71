"""Deployment cost of a trained model (`perception.evaluation.deployment`), measured on a real model."""

from __future__ import annotations

import pytest
import torch

from perception.evaluation.deployment import measure_deployment, parameter_count
from perception.models import build


@pytest.fixture
def pointnet_file(tmp_path):
    model = build("pointnet", "tiny", num_classes=5)
    path = tmp_path / "seed-0.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_a_model_is_timed_sized_and_counted(pointnet_file) -> None:
    model, path = pointnet_file
    sample = torch.randn(1, 64, 3)
    cost = measure_deployment(model, sample, batch_size=8, checkpoint=path, min_run_time=0.05)
    assert cost.latency_ms > 0 and cost.latency_ms_lo <= cost.latency_ms <= cost.latency_ms_hi
    assert cost.latency_ms_q25 <= cost.latency_ms <= cost.latency_ms_q75
    assert cost.blocks >= 2
    assert cost.throughput_per_s > 0
    assert cost.parameters == sum(p.numel() for p in model.parameters()) == parameter_count(model)
    assert cost.checkpoint_bytes == path.stat().st_size
    assert cost.input_shape == [64, 3] and cost.batch_size == 8
    assert cost.device == "cpu" and cost.threads == torch.get_num_threads()
    assert cost.peak_memory_mb > 0


def test_more_work_per_frame_takes_longer(pointnet_file) -> None:
    """The latency is measured, not counted: 16x the points per cloud takes longer."""
    model, path = pointnet_file
    small = measure_deployment(model, torch.randn(1, 32, 3), batch_size=2, checkpoint=path, min_run_time=0.1)
    large = measure_deployment(
        model, torch.randn(1, 4096, 3), batch_size=2, checkpoint=path, min_run_time=0.1
    )
    assert large.latency_ms_lo > small.latency_ms_hi


def test_the_sample_must_be_a_batch_of_one(pointnet_file) -> None:
    model, path = pointnet_file
    with pytest.raises(ValueError, match="batch of one"):
        measure_deployment(model, torch.randn(2, 32, 3), batch_size=2, checkpoint=path)
