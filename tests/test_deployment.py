"""Deployment cost of a trained model (`perception.evaluation.deployment`), measured on real models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perception.evaluation.deployment import (
    LatencyRounds,
    machine_reference,
    measure_deployment,
    median_interval,
    parameter_count,
)
from perception.models import build


@pytest.fixture
def pointnet_file(tmp_path):
    model = build("pointnet", "tiny", num_classes=5).eval()
    path = tmp_path / "seed-0.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_a_model_is_timed_sized_and_counted(pointnet_file) -> None:
    model, path = pointnet_file
    sample = torch.randn(1, 64, 3)
    rounds = LatencyRounds({"pointnet": (model, sample)}, block_ms=2.0, threads=1)
    rounds.window(4)
    rounds.window(4)
    latency = rounds.latency("pointnet", resamples=200)
    cost = measure_deployment(model, sample, latency, batch_size=8, checkpoint=path, min_run_time=0.05)
    assert cost.latency_ms > 0 and cost.latency_ms_lo <= cost.latency_ms <= cost.latency_ms_hi
    assert cost.latency_ms_q25 <= cost.latency_ms <= cost.latency_ms_q75
    assert (cost.windows, cost.rounds) == (2, 8)
    assert cost.throughput_per_s > 0
    assert cost.parameters == sum(p.numel() for p in model.parameters()) == parameter_count(model)
    assert cost.checkpoint_bytes == path.stat().st_size
    assert cost.input_shape == [64, 3] and cost.batch_size == 8
    assert cost.device == "cpu" and cost.threads == 1
    assert cost.peak_memory_mb > 0


def test_more_work_per_frame_takes_longer(pointnet_file) -> None:
    """The latency is measured, not counted: 64x the points per cloud takes longer, in the same rounds."""
    model, _ = pointnet_file
    models = {"small": (model, torch.randn(1, 32, 3)), "large": (model, torch.randn(1, 2048, 3))}
    rounds = LatencyRounds(models, block_ms=2.0, threads=1)
    rounds.window(5)
    rounds.window(5)
    small, large = rounds.latency("small", 500), rounds.latency("large", 500)
    assert large.lo > small.hi


def test_every_model_is_timed_in_every_round_of_every_window(pointnet_file) -> None:
    model, _ = pointnet_file
    models = {name: (model, torch.randn(1, 16, 3)) for name in ("a", "b", "c")}
    rounds = LatencyRounds(models, block_ms=1.0, threads=1)
    for _ in range(3):
        rounds.window(2)
    assert {name: [len(w) for w in windows] for name, windows in rounds.times.items()} == {
        name: [2, 2, 2] for name in models
    }


def test_the_interval_covers_the_spread_between_windows() -> None:
    """Rounds tight within each window: windows apart give an interval that spans them; windows that agree
    give a narrow one."""
    rng = np.random.default_rng(0)
    apart = np.stack([level + 0.001 * rng.standard_normal(8) for level in (1.0, 1.1, 1.2)])  # [3, 8]
    lo, hi = median_interval(apart, 2000, np.random.default_rng(1))
    assert lo < 1.01 and hi > 1.19
    agree = np.stack([1.1 + 0.001 * rng.standard_normal(8) for _ in range(3)])  # [3, 8]
    lo, hi = median_interval(agree, 2000, np.random.default_rng(1))
    assert 1.09 < lo <= hi < 1.11


def test_one_window_is_the_plain_bootstrap_of_its_rounds() -> None:
    window = np.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
    lo, hi = median_interval(window, 4000, np.random.default_rng(0))
    assert 1.0 <= lo < 3.0 < hi <= 5.0


def test_the_sample_must_be_a_batch_of_one(pointnet_file) -> None:
    model, path = pointnet_file
    with pytest.raises(ValueError, match="batch of one"):
        LatencyRounds({"pointnet": (model, torch.randn(2, 32, 3))})
    rounds = LatencyRounds({"pointnet": (model, torch.randn(1, 32, 3))}, block_ms=1.0)
    rounds.window(2)
    with pytest.raises(ValueError, match="batch of one"):
        measure_deployment(
            model, torch.randn(2, 32, 3), rounds.latency("pointnet", 100), batch_size=2, checkpoint=path
        )


def test_the_machine_reference_is_the_same_workload_in_every_run() -> None:
    """Same weights, same input, same output: only the machine's speed can move its latency."""
    (first, x), (second, y) = machine_reference(), machine_reference()
    assert torch.equal(x, y) and x.shape == (1, 128, 96)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with torch.inference_mode():
        assert torch.equal(first(x), second(y))
    # and what it is timed on scales like a workload: 4x the tokens take longer, in the same rounds
    rounds = LatencyRounds({"reference": (first, x), "longer": (first, x.repeat(1, 4, 1))}, block_ms=2.0)
    rounds.window(5)
    assert rounds.latency("longer", 200).lo > rounds.latency("reference", 200).hi


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_cost_is_measured_on_the_gpu(pointnet_file) -> None:
    model, path = pointnet_file
    model = model.cuda()
    sample = torch.randn(1, 1024, 3, device="cuda")
    rounds = LatencyRounds({"pointnet": (model, sample)}, block_ms=2.0)
    rounds.window(4)
    rounds.window(4)
    latency = rounds.latency("pointnet", 500)
    cost = measure_deployment(model, sample, latency, batch_size=4, checkpoint=path)
    assert cost.device.startswith("cuda") and (cost.windows, cost.rounds) == (2, 8)
    assert 0 < cost.latency_ms_lo <= cost.latency_ms <= cost.latency_ms_hi
    assert cost.peak_memory_mb > 0 and cost.throughput_per_s > 0


def test_windows_timed_elsewhere_are_recorded_as_their_own() -> None:
    """`time_window` times without recording; `add_window` records it."""
    model = build("pointnet", "tiny", num_classes=5).eval()
    models = {"a": (model, torch.randn(1, 32, 3)), "b": (model, torch.randn(1, 64, 3))}
    rounds = LatencyRounds(models, block_ms=1.0)
    window = rounds.time_window(3, index=0)
    assert rounds.times == {} and {name: len(t) for name, t in window.items()} == {"a": 3, "b": 3}
    rounds.add_window(window)
    rounds.add_window(rounds.time_window(3, index=1))
    assert {name: len(w) for name, w in rounds.times.items()} == {"a": 2, "b": 2}
    with pytest.raises(ValueError, match="a window must time every model"):
        rounds.add_window({"a": window["a"]})


def test_each_window_of_the_stage_runs_in_a_fresh_process(tmp_path) -> None:
    """Where weights land in memory moves latency from one process to the next: every window samples it."""
    import os

    from perception.models.checkpoint import ModelCheckpoint, model_config, save_checkpoint
    from pipeline.evaluation.measurements import Checkpoint, DeploymentTiming

    model = build("pointnet", "tiny", num_classes=5).eval()
    saved = ModelCheckpoint("pointnet", model_config(model), model.state_dict(), {"dataset": "points"})
    path = tmp_path / "seed-0.pt"
    save_checkpoint(path, saved)
    checkpoints = {"pointnet-none": {0: Checkpoint("pointnet-none", 0, saved, model, path)}}
    samples = {"points": torch.randn(1, 32, 3)}
    timing = DeploymentTiming(
        checkpoints, samples, device=torch.device("cpu"), block_ms=1.0, threads=1, seed=0
    )
    for _ in range(3):
        timing.window(2)
    assert len(set(timing.window_pids)) == 3 and os.getpid() not in timing.window_pids
    assert {name: [len(w) for w in windows] for name, windows in timing.rounds.times.items()} == {
        "pointnet-none": [2, 2, 2],
        "machine reference": [2, 2, 2],
    }
    costs = timing.costs(batch_size=2, min_run_time=0.01, resamples=100, progress=lambda _: None)
    assert set(costs) == {"pointnet-none"} and costs["pointnet-none"].windows == 3
    assert timing.reference(100).rounds == 6


def test_windows_build_side_by_side_but_time_one_at_a_time(tmp_path) -> None:
    """The stage's two windows at a pause start together; their timing never overlaps, and each runs in its
    own process with the block lengths fixed once for the stage."""
    import os

    from perception.models.checkpoint import ModelCheckpoint, model_config, save_checkpoint
    from pipeline.evaluation.measurements import Checkpoint, DeploymentTiming

    model = build("pointnet", "tiny", num_classes=5).eval()
    saved = ModelCheckpoint("pointnet", model_config(model), model.state_dict(), {"dataset": "points"})
    path = tmp_path / "seed-0.pt"
    save_checkpoint(path, saved)
    checkpoints = {"pointnet-none": {0: Checkpoint("pointnet-none", 0, saved, model, path)}}
    timing = DeploymentTiming(
        checkpoints,
        {"points": torch.randn(1, 32, 3)},
        device=torch.device("cpu"),
        block_ms=2.0,
        threads=1,
        seed=0,
    )
    timing.windows(2, 3)
    forwards = dict(timing.rounds.forwards)
    timing.windows(2, 3)
    assert timing.rounds.forwards == forwards and set(forwards) == {"pointnet-none", "machine reference"}
    assert len(set(timing.window_pids)) == 4 and os.getpid() not in timing.window_pids
    spans = sorted(timing.window_spans)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False))
    assert [len(w) for w in timing.rounds.times["pointnet-none"]] == [3, 3, 3, 3]
