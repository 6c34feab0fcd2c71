"""What a trained model costs to deploy, measured on the machine that runs this: batch-1 latency at the input
size it was trained on, throughput at a batch size, peak memory, parameters and the checkpoint's bytes.

Latency is timed for all models together, in rounds: each round times one block of forwards (about
`block_ms` long) of every model, in a fresh random order, so a slow spell of the machine falls on all models
alike instead of on whichever was being timed. The rounds come in windows spread over a stage (the evaluate
stage times two before its parallel parts, two after them and two at its end, each in a fresh process that
rebuilds the models): a shared machine's speed drifts over minutes, and a model's latency moves from one
process to the next, so an interval from one burst of timing in one process would claim more precision
than a second run bears out. The latency reported is the median over every round of every window, with a
two-level bootstrap interval of that median (windows, then rounds within each) and the rounds'
interquartile range; a robot's frame budget compares with the median.

The windows cover drift within a run, not a machine that changed between runs: a VM moved to another host,
or a host busier for an hour, runs every model at another speed. `machine_reference` is a fixed workload
(the same weights and input in every run) timed in the same rounds as the models, so two runs' references
say whether the machine ran at the same speed; where they disagree, so will the models, and the comparison
(`benchmarks.latency_agreement`) is of two machines, not of two measurements. Peak memory is the
allocator's, as the cost sweep measures it (`perception.evaluation.cost.peak_memory_mb`).

Glossary: W windows, R rounds per window, B bootstrap resamples.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils import benchmark

from perception.evaluation.cost import peak_memory_mb, resample_medians


@dataclass(frozen=True)
class DeploymentCost:
    """One model's deployment cost on `device` with `threads` intra-op threads."""

    latency_ms: float  # batch 1, median over every timed round
    latency_ms_lo: float  # two-level bootstrap interval of the median (windows, then rounds)
    latency_ms_hi: float
    latency_ms_q25: float  # the rounds' spread
    latency_ms_q75: float
    windows: int
    rounds: int  # in all windows together
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


@dataclass(frozen=True)
class Latency:
    """Batch-1 latency from rounds in windows: the median, its interval and the rounds' quartiles (ms)."""

    median: float
    lo: float
    hi: float
    q25: float
    q75: float
    windows: int
    rounds: int


REFERENCE = "machine reference"  # its name among the timed models: no variant has a space in its name


def machine_reference(device: torch.device | str = "cpu") -> tuple[nn.Module, torch.Tensor]:
    """The fixed workload every run times beside the models: a transformer encoder layer (width 96, 4 heads,
    feed-forward 384) on one sequence of 128 tokens, float32, weights and input drawn from seed 0 on the CPU.
    Attention, matrix products, softmax and layer norm: the operations the study's models spend their time in.
    """
    generator = torch.Generator().manual_seed(0)
    layer = nn.TransformerEncoderLayer(96, 4, dim_feedforward=384, dropout=0.0, batch_first=True)
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    tokens = torch.randn(1, 128, 96, generator=generator)  # (batch 1, tokens, width)
    return layer.to(device).eval(), tokens.to(device)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _timer(model: nn.Module, x: torch.Tensor, threads: int) -> benchmark.Timer:
    return benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=threads)


def _blocks_ms(model: nn.Module, x: torch.Tensor, min_run_time: float, threads: int) -> np.ndarray:
    """Mean milliseconds per forward in each timed block (`blocked_autorange`; CUDA is synchronised)."""
    with torch.inference_mode():
        model(x)  # warm-up: first-call allocations, lazy kernels
        measurement = _timer(model, x, threads).blocked_autorange(min_run_time=min_run_time)
    return 1000.0 * np.asarray(measurement.times, dtype=float)


@dataclass
class LatencyRounds:
    """Batch-1 latency of several models, timed interleaved in rounds; `window` times one more window.

    `models`: name -> (model in eval mode, one input of batch 1) on the device to time on. `times[name]` is
    float[W, R] milliseconds per forward, each entry one block's mean.
    """

    models: Mapping[str, tuple[nn.Module, torch.Tensor]]
    block_ms: float = 20.0
    threads: int = 1
    seed: int = 0
    times: dict[str, list[np.ndarray]] = field(default_factory=dict)
    forwards: dict[str, int] = field(default_factory=dict)  # per block, fixed by the first window

    def __post_init__(self) -> None:
        for name, (_, sample) in self.models.items():
            if sample.shape[0] != 1:
                raise ValueError(
                    f"{name}: the sample must be a batch of one, got shape {tuple(sample.shape)}"
                )

    def window(self, rounds: int) -> None:
        """Time `rounds` more rounds of every model, each round in its own random order."""
        index = len(next(iter(self.times.values()), []))
        for name, times in self.time_window(rounds, index).items():
            self.times.setdefault(name, []).append(times)

    def time_window(self, rounds: int, index: int) -> dict[str, np.ndarray]:
        """Window `index`'s times, float[R] per model, without recording them (a window timed in another
        process is recorded with `add_window`). The rounds' orders are drawn from (seed, index)."""
        order = np.random.default_rng([self.seed, index])
        names = list(self.models)
        timers = {name: _timer(model, x, self.threads) for name, (model, x) in self.models.items()}
        window: dict[str, list[float]] = {name: [] for name in names}
        with torch.inference_mode():
            self._warm_up(timers)
            for _ in range(rounds):
                for position in order.permutation(len(names)):
                    name = names[position]
                    block = timers[name].timeit(self.forwards[name])
                    window[name].append(1000.0 * block.mean)
        return {name: np.asarray(window[name], dtype=float) for name in names}

    def calibrate(self) -> None:
        """Fix every model's forwards per block (about `block_ms` of them) where not yet fixed: once, so that
        every window of a stage times blocks of the same length."""
        timers = {name: _timer(model, x, self.threads) for name, (model, x) in self.models.items()}
        with torch.inference_mode():
            self._warm_up(timers)

    def _warm_up(self, timers: Mapping[str, benchmark.Timer]) -> None:
        """Two forwards of every model, and its forwards per block where not yet fixed."""
        for name, timer in timers.items():
            timer.timeit(2)
            if name not in self.forwards:
                once = timer.timeit(3).mean
                self.forwards[name] = max(1, round(self.block_ms / 1000.0 / max(once, 1e-9)))

    def add_window(self, times: Mapping[str, np.ndarray]) -> None:
        """Record a window timed elsewhere (`time_window`), for every model."""
        if set(times) != set(self.models):
            raise ValueError(
                f"a window must time every model: got {sorted(times)}, have {sorted(self.models)}"
            )
        for name in self.models:
            self.times.setdefault(name, []).append(np.asarray(times[name], dtype=float))

    def latency(self, name: str, resamples: int = 2000, level: float = 0.95) -> Latency:
        """The median over every round of `name`, with its two-level bootstrap interval."""
        if not self.times.get(name):
            raise ValueError(f"{name}: no window was timed")
        windows = np.stack(self.times[name])  # [W, R]
        lo, hi = median_interval(windows, resamples, np.random.default_rng([self.seed, 0x1A7]), level)
        flat = windows.reshape(-1)  # [W*R]
        q25, median, q75 = np.quantile(flat, [0.25, 0.5, 0.75]).tolist()
        return Latency(median, lo, hi, q25, q75, windows.shape[0], flat.size)


def median_interval(
    windows: np.ndarray, resamples: int, rng: np.random.Generator, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of the median of `windows` float[W, R] under a two-level bootstrap: draw W windows
    with replacement, then R rounds with replacement within each drawn window. With one window, the plain
    bootstrap over its rounds."""
    num_windows, num_rounds = windows.shape
    if num_windows == 1:
        medians = resample_medians([windows[0]], resamples, rng)[:, 0]  # [B]
    else:
        picked = rng.integers(0, num_windows, size=(resamples, num_windows))  # [B, W]
        rounds = rng.integers(0, num_rounds, size=(resamples, num_windows, num_rounds))  # [B, W, R]
        drawn = windows[picked[:, :, None], rounds]  # [B, W, R]
        medians = np.median(drawn.reshape(resamples, -1), axis=1)  # [B]
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(medians, [tail, 1.0 - tail]).tolist()
    return lo, hi


def measure_deployment(
    model: nn.Module,
    sample: torch.Tensor,
    latency: Latency,
    *,
    batch_size: int,
    checkpoint: Path,
    min_run_time: float = 0.2,
    threads: int = 1,
) -> DeploymentCost:
    """The cost of `model` (in eval mode) on one input `sample` (a batch of one, the shape it trained on),
    given its batch-1 `latency` (`LatencyRounds`), and on `batch_size` copies of it, on `sample`'s
    device with `threads` intra-op threads."""
    if sample.shape[0] != 1:
        raise ValueError(f"sample must be a batch of one, got shape {tuple(sample.shape)}")
    model = model.eval()
    batch = sample.expand(batch_size, *sample.shape[1:]).contiguous()  # (batch_size, ...)
    batch_ms = float(np.median(_blocks_ms(model, batch, min_run_time, threads)))
    memory, method = peak_memory_mb(model, sample)
    return DeploymentCost(
        latency_ms=latency.median,
        latency_ms_lo=latency.lo,
        latency_ms_hi=latency.hi,
        latency_ms_q25=latency.q25,
        latency_ms_q75=latency.q75,
        windows=latency.windows,
        rounds=latency.rounds,
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
