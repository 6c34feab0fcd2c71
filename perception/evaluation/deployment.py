"""What a trained model costs to deploy, measured on the machine that runs this: batch-1 latency at the input
size it was trained on, throughput at a batch size, peak memory, parameters and the checkpoint's bytes.

Latency is `torch.utils.benchmark`'s: `Timer.blocked_autorange` runs the forward in blocks until
`min_run_time` seconds have passed, and every block's mean time per call is one measurement. The latency
reported is the median block, with a percentile-bootstrap interval of that median over the blocks and their
interquartile range; a robot's frame budget compares with the median. Peak memory is the allocator's, as
the cost sweep measures it (`perception.evaluation.cost.peak_memory_mb`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils import benchmark

from perception.evaluation.cost import peak_memory_mb, resample_medians


@dataclass(frozen=True)
class DeploymentCost:
    """One model's deployment cost on `device` with `threads` intra-op threads."""

    latency_ms: float  # batch 1, median of the timed blocks
    latency_ms_lo: float  # bootstrap interval of the median
    latency_ms_hi: float
    latency_ms_q25: float  # the blocks' spread
    latency_ms_q75: float
    blocks: int
    throughput_per_s: float  # samples per second at `batch_size`
    batch_size: int
    peak_memory_mb: float  # batch 1, above the pre-forward baseline
    memory_method: str
    parameters: int
    checkpoint_bytes: int
    input_shape: list[int]  # one sample's, as trained
    device: str
    threads: int

    def as_dict(self) -> dict:
        return asdict(self)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _blocks_ms(model: nn.Module, x: torch.Tensor, min_run_time: float, threads: int) -> np.ndarray:
    """Mean milliseconds per forward in each timed block (`blocked_autorange`; CUDA is synchronised)."""
    timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=threads)
    with torch.inference_mode():
        model(x)  # warm-up: first-call allocations, lazy kernels
        measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return 1000.0 * np.asarray(measurement.times, dtype=float)


def measure_deployment(
    model: nn.Module,
    sample: torch.Tensor,
    *,
    batch_size: int,
    checkpoint: Path,
    min_run_time: float = 0.2,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> DeploymentCost:
    """The cost of `model` (in eval mode) on one input `sample` (a batch of one, the shape it trained on)
    and on `batch_size` copies of it, on `sample`'s device with this process's torch threads."""
    if sample.shape[0] != 1:
        raise ValueError(f"sample must be a batch of one, got shape {tuple(sample.shape)}")
    model = model.eval()
    threads = torch.get_num_threads()
    blocks = _blocks_ms(model, sample, min_run_time, threads)
    medians = resample_medians([blocks], resamples, np.random.default_rng(seed))[:, 0]  # [R]
    tail = (1.0 - level) / 2
    batch = sample.expand(batch_size, *sample.shape[1:]).contiguous()  # (batch_size, ...)
    batch_ms = float(np.median(_blocks_ms(model, batch, min_run_time, threads)))
    memory, method = peak_memory_mb(model, sample)
    return DeploymentCost(
        latency_ms=float(np.median(blocks)),
        latency_ms_lo=float(np.quantile(medians, tail)),
        latency_ms_hi=float(np.quantile(medians, 1 - tail)),
        latency_ms_q25=float(np.quantile(blocks, 0.25)),
        latency_ms_q75=float(np.quantile(blocks, 0.75)),
        blocks=int(blocks.size),
        throughput_per_s=1000.0 * batch_size / batch_ms,
        batch_size=batch_size,
        peak_memory_mb=float(memory),
        memory_method=method,
        parameters=parameter_count(model),
        checkpoint_bytes=checkpoint.stat().st_size,
        input_shape=list(sample.shape[1:]),
        device=str(sample.device),
        threads=threads,
    )
