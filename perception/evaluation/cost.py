"""Compute cost of image backbones against the number of tokens: latency, peak memory, FLOPs.

The study tests the claim "attention cost grows quadratically with the number of tokens; state space
models (Mamba) grow linearly". `cost_study` measures each model at several resolutions (tokens =
(resolution / patch)^2), fits the exponent k of cost ~ tokens^k in log-log with a bootstrap interval, and
finds the token count from which pure Mamba is faster than ViT. The essay's published table
(`ESSAY_TABLE`) is quoted beside it, not computed.

Models (`default_cost_models`), all at one width and depth, batch 1:
  - vit:           ViT with the fused attention kernel (`F.scaled_dot_product_attention`), as trained.
  - vit_explicit:  the same ViT, same weights, with explicit softmax attention, which materialises the
                   (T, T) attention matrix per head. Fused and explicit do the same arithmetic; only the
                   memory they hold (and how fast they run) differs, so "memory scales like compute" can
                   hold for one and not the other.
  - mamba_hybrid:  Mamba blocks, then a minority of attention blocks.
  - mamba:         pure Mamba (attn_layers=0).

What each number is:
  - latency: wall time of one forward under `torch.inference_mode`. At each resolution the models are
    timed together in alternating short blocks (`time_interleaved`): rounds of one block per model, in a
    seeded random order, each block a `timeit` run of enough forwards to fill about 50 ms (CUDA
    synchronised at both ends), after one untimed warm-up forward each. A row's latency is the 20th
    percentile of its blocks (`LATENCY_QUANTILE`): load from other processes only ever lengthens a block,
    so the fastest blocks are the least disturbed. The median and quartiles are kept as the spread, and the
    20th percentile gets a bootstrap interval.
  - contention: during every block, this process's CPU time against its threads' wall time (`own_cpu`)
    and the CPU time every other process used, as a share of the machine (`others_cpu`, from
    /proc/stat); on CUDA, the other processes NVML sees on the GPU. The rows carry them, `busiest` names
    the worst, and the verdict on the cost claim is inconclusive where the machine was busy.
  - peak memory: CUDA's `max_memory_allocated` above the baseline; on CPU, torch.profiler's record of every
    c10 allocator alloc/free during one forward, and the peak of their running sum. Both count activations
    and workspaces only (the weights and the input exist before the forward starts). One measurement: on
    CPU the same forward allocates the same bytes every time, so there is no spread to resample.
  - FLOPs: COUNTED, not measured (context only): `torch.utils.flop_counter.FlopCounterMode` over one
    forward, plus our own count of the selective scan, 9*B*L*D*N per scan (the counter sees at most the
    scan's output contraction, and none of its recurrence).
  - attention entries: the attention-matrix entries an explicit implementation would materialise. The fused
    kernel does not materialise them.

Exponents: least squares of log(cost) on log(tokens), over the upper part of the sweep (tokens >=
`fit_min_tokens`, where the leading term dominates the per-token and fixed costs) and over the whole sweep.
A model's latency exponent is fitted from its rows' 20th percentiles; its interval is a percentile
bootstrap that redraws the block times within every token count and refits. The gap between two models'
exponents is fitted from their per-round ratios (`latency_ratio_exponent`): the two blocks of a round ran
back to back, so a slowdown that lasts a round cancels in the ratio, where a slowdown between token counts
would otherwise bend each model's own fit.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import time
import timeit
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import psutil
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from perception.layers.attention import Attention
from perception.models import build
from perception.models.mamba_hybrid import MultiScanMamba
from perception.ops.scan import resolve_backend, selective_scan

# ------------------------------------------------------------------------------------- the essay's table


@dataclass(frozen=True)
class EssayRow:
    """One row of the essay's table, as published (a citation: rounded numbers, not ours)."""

    resolution: int  # px per side
    tokens: int  # (resolution / 16)^2
    attention_entries: float  # tokens^2, as the essay rounds it
    relative_cost: float  # attention entries relative to 224 px


ESSAY_PATCH_SIZE = 16  # the essay's patch size (quoted)

# QUOTED from the essay, not computed: "38K / 332K / 1M / 16.8M" entries, "1x / 8.7x / 26x / 440x" cost.
ESSAY_TABLE: tuple[EssayRow, ...] = (
    EssayRow(224, 196, 38e3, 1.0),
    EssayRow(384, 576, 332e3, 8.7),
    EssayRow(512, 1024, 1e6, 26.0),
    EssayRow(1024, 4096, 16.8e6, 440.0),
)


def essay_rows() -> list[dict[str, Any]]:
    """The essay's rows beside the exact numbers: tokens = (res/16)^2, entries = tokens^2, cost vs 224 px.

    Keys ending in `_essay` are the essay's (rounded) numbers; the others are computed here. Like the essay,
    this counts one head and no class token.
    """
    base = (224 // ESSAY_PATCH_SIZE) ** 4
    rows = []
    for row in ESSAY_TABLE:
        tokens = (row.resolution // ESSAY_PATCH_SIZE) ** 2
        rows.append(
            {
                "resolution": row.resolution,
                "patch_size": ESSAY_PATCH_SIZE,
                "tokens_essay": row.tokens,
                "tokens": tokens,
                "attention_entries_essay": row.attention_entries,
                "attention_entries": tokens**2,
                "relative_cost_essay": row.relative_cost,
                "relative_cost": tokens**2 / base,
            }
        )
    return rows


# -------------------------------------------------------------------------------- counts: FLOPs, entries


def scan_flops(model: nn.Module, tokens: int, batch: int) -> int:
    """FLOPs of every selective scan `model` runs on `batch` images of `tokens` tokens: 9*B*L*D*N each.

    Per step and channel a scan computes exp(dt*A), dt*B*x, h = dA*h + dBx and C.h over N states: about
    9 FLOPs per (b, l, d, n). Each Mamba mixer runs one scan per direction (two for Vim's bidirectional
    orders, four for the cross-scan), each over d_inner channels; the code stacks them into one grouped
    scan of D = directions * d_inner channels, the same count.
    0 for a model without Mamba blocks.
    """
    total = 0
    for m in model.modules():
        if isinstance(m, MultiScanMamba):
            total += 9 * batch * tokens * (m.num_directions * m.d_inner) * m.d_state
    return total


def _prefix_tokens(model: nn.Module) -> int:
    """Tokens attention sees besides the patches: ViT's class token (cls_token is (1, n, dim)), else 0."""
    cls = getattr(model, "cls_token", None)
    return int(cls.shape[1]) if isinstance(cls, torch.Tensor) else 0


def attention_entries(model: nn.Module, tokens: int) -> int:
    """Attention-matrix entries per image an explicit implementation materialises: sum of heads * S^2.

    S = tokens plus the class token where the model has one (ViT; MambaHybrid has none). 0 for pure Mamba.
    """
    seq = tokens + _prefix_tokens(model)
    return sum(m.heads * seq * seq for m in model.modules() if isinstance(m, Attention))


# FlopCounterMode (torch 2.13) has formulas for the CUDA SDPA kernels only; CPU dispatches
# F.scaled_dot_product_attention to this op, whose FLOPs it would silently drop: the quadratic term.
def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FlopCounterMode's total for one forward of `model` on `x` (CPU attention included)."""
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS)
    with torch.inference_mode(), counter:
        model(x)
    return int(counter.get_total_flops())


@functools.lru_cache(maxsize=64)
def _scan_flops_seen(backend: str, device: str, dtype: str, b: int, d: int, L: int, n: int, g: int) -> int:
    """FLOPs FlopCounterMode attributes to one selective scan of this shape, as `backend` runs it on
    `device`: chunked's output contraction (a bmm, 2*b*d*L*n); nothing for ref (elementwise ops only) or
    the native kernel (one opaque C call).

    Measured by running that scan on zeros of that shape, device and dtype, so the backend takes the path
    it takes in the model. (It once ran on meta tensors, where `native` hands over to `chunked`: the count
    then subtracted chunked's bmm, which the native path never adds: flops_total came out 1-3% low at dim
    192, depth 4.)
    """
    dev, dt = torch.device(device), getattr(torch, dtype)
    u = torch.zeros(b, d, L, device=dev, dtype=dt)
    A = -torch.ones(d, n, device=dev, dtype=dt)
    BC = torch.zeros(b, g, n, L, device=dev, dtype=dt)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        selective_scan(u, u, A, BC, BC, delta_softplus=True, backend=backend)
    return int(counter.get_total_flops())


def _counted_scan_flops(model: nn.Module, tokens: int, batch: int) -> int:
    """What the counter already saw of `scan_flops`, so flops_total does not count it twice."""
    total = 0
    for m in model.modules():
        if isinstance(m, MultiScanMamba):
            dtype = str(m.A_log.dtype).removeprefix("torch.")
            # One grouped scan: num_directions * d_inner channels, a B/C group per direction.
            shape = (batch, m.num_directions * m.d_inner, tokens, m.d_state, m.num_directions)
            total += _scan_flops_seen(m.scan_backend, str(m.A_log.device), dtype, *shape)
    return total


def model_flops(model: nn.Module, x: torch.Tensor, tokens: int) -> tuple[int, int, int]:
    """(counted, scan, total) FLOPs of one forward: the counter's total, our scan count, and
    counted - (what the counter saw of the scans) + scan."""
    counted = count_flops(model, x)
    scans = scan_flops(model, tokens, x.shape[0])
    seen = _counted_scan_flops(model, tokens, x.shape[0]) if scans else 0
    return counted, scans, counted - seen + scans


# ------------------------------------------------------------------------------------------ peak memory


def _cpu_peak_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes held by the c10 CPU allocator above the start, over one forward.

    torch.profiler(profile_memory=True) records each alloc (+bytes) and free (-bytes) with a timestamp;
    the running sum in time order is the bytes live, its maximum the peak. Exact for tensors; buffers
    allocated outside c10 (oneDNN/MKL scratch, the native scan's per-thread workspace) are not seen.
    """
    from torch._C._profiler import _EventType  # the event tree torch's own memory profiler reads

    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.inference_mode(), torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        model(x)
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    events.sort()
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak


CPU_MEMORY_METHOD = "cpu: torch.profiler profile_memory, peak running sum of c10 alloc/free events"
CUDA_MEMORY_METHOD = "cuda: max_memory_allocated minus memory_allocated before the forward"


def peak_memory_mb(model: nn.Module, x: torch.Tensor) -> tuple[float, str]:
    """(peak MiB above the pre-forward baseline, method) for one forward on x's device."""
    device = x.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            model(x)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20, CUDA_MEMORY_METHOD
    return _cpu_peak_bytes(model, x) / 2**20, CPU_MEMORY_METHOD


# ----------------------------------------------------------------------------------------------- timing


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op threads, then restore the number there was."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA runs asynchronously: time the work, not the launch


def _synchronizing_clock(device: torch.device) -> Callable[[], float]:
    """time.perf_counter, after the device's queued work: a block then times the work, not the launch."""

    def clock() -> float:
        _synchronize(device)
        return time.perf_counter()

    return clock


# --- contention: what else the machine did while a block was timed


@dataclass(frozen=True)
class Contention:
    """CPU time over one or more timed blocks: this process's and the rest of the machine's."""

    wall_s: float
    own_cpu_s: float  # this process's user + system time (every thread)
    # every other process's busy CPU time on the machine: the machine's less this process's, each read in
    # clock ticks, so one short block's can come out a tick negative; only a sum over blocks is clipped
    others_cpu_s: float
    cores: int
    threads: int
    gpu_other_processes: int | None = None  # other processes on the GPU (NVML); None where unknown

    @property
    def others(self) -> float:
        """Other processes' CPU use, as a share of the whole machine: ~0 quiet, 1 with every core busy."""
        return max(0.0, self.others_cpu_s) / max(self.wall_s * self.cores, 1e-12)

    @property
    def own(self) -> float:
        """This process's CPU use as a share of what its threads could use: below 1 where it waited for
        cores (or ran serial code)."""
        return self.own_cpu_s / max(self.wall_s * self.threads, 1e-12)

    def __add__(self, other: Contention) -> Contention:
        gpu = [g for g in (self.gpu_other_processes, other.gpu_other_processes) if g is not None]
        return replace(
            self,
            wall_s=self.wall_s + other.wall_s,
            own_cpu_s=self.own_cpu_s + other.own_cpu_s,
            others_cpu_s=self.others_cpu_s + other.others_cpu_s,
            gpu_other_processes=max(gpu) if gpu else None,
        )


def _gpu_other_processes(device: torch.device) -> int | None:
    """Processes other than this one with a context on `device`, by NVML (nvidia-ml-py), or None."""
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        index = torch.cuda._get_nvml_device_index(device)  # CUDA_VISIBLE_DEVICES -> NVML's numbering
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        processes += pynvml.nvmlDeviceGetGraphicsRunningProcesses(handle)
    except Exception:  # no NVML, no permission, an old driver: unknown, not "none"
        return None
    return len({p.pid for p in processes} - {os.getpid()})


class ContentionMeter:
    """Reads the CPU time of this process and of the whole machine (/proc/stat through psutil) around a
    block; `others` is the machine's busy time less this process's. Cheap: a few system calls a block."""

    def __init__(self, threads: int, device: torch.device):
        self.threads, self.device = threads, device
        self.cores = psutil.cpu_count() or 1
        self.process = psutil.Process()

    def _read(self) -> tuple[float, float, float]:
        machine = psutil.cpu_times()
        busy = machine.user + machine.nice + machine.system + getattr(machine, "irq", 0.0)
        busy += getattr(machine, "softirq", 0.0) + getattr(machine, "steal", 0.0)
        own = self.process.cpu_times()
        return time.perf_counter(), own.user + own.system, busy

    @contextlib.contextmanager
    def block(self) -> Iterator[list[Contention]]:
        """Measure the block; the Contention is appended to the yielded list when the block ends."""
        out: list[Contention] = []
        wall0, own0, busy0 = self._read()
        yield out
        wall1, own1, busy1 = self._read()
        own = own1 - own0
        out.append(
            Contention(
                wall_s=wall1 - wall0,
                own_cpu_s=own,
                others_cpu_s=(busy1 - busy0) - own,
                cores=self.cores,
                threads=self.threads,
                gpu_other_processes=_gpu_other_processes(self.device),
            )
        )


# --- timing in alternating blocks

BLOCK_S = 0.05  # a block's target length: short, so that load that comes and goes hits every model alike


@dataclass(frozen=True)
class Interleaved:
    """Block times of several models at one input size, timed in alternating rounds: block j of every
    model was timed in round j, one block per model in a seeded random order, so a slowdown of the
    machine that lasts a round hits them all."""

    times: dict[str, list[float]]  # model -> seconds per forward of each block, in round order
    forwards_per_block: dict[str, int]
    contention: dict[str, Contention]  # model -> summed over its blocks


def time_interleaved(
    forwards: dict[str, Callable[[], None]],
    device: torch.device,
    min_run_time: float,
    min_blocks: int,
    threads: int,
    rng: np.random.Generator,
    block_s: float = BLOCK_S,
) -> Interleaved:
    """Time each of `forwards` (one forward pass each, e.g. ViT's and pure Mamba's at one resolution) in
    alternating short blocks.

    Each model first runs one untimed warm-up forward (first-call allocations, kernel selection), whose
    time sets its first block's size: as many forwards as fill `block_s` (at least one); the first block's
    time per forward sets the size of the rest. Then rounds: every model
    one block, in an order drawn from `rng`, until there are `min_blocks` rounds and every model has spent
    `min_run_time` seconds in its blocks. Blocks are `timeit` runs (CUDA synchronised around them), each
    measured for contention. `threads` is what the caller set (`torch_threads`), recorded for the own-CPU
    share.
    """
    names = list(forwards)
    number = {}
    for name, forward in forwards.items():
        _synchronize(device)
        start = time.perf_counter()
        forward()
        _synchronize(device)
        number[name] = max(1, int(block_s / max(time.perf_counter() - start, 1e-9)))
    # Blocks are stdlib timeit runs, with CUDA synchronised at both ends as torch.utils.benchmark does:
    # its Timer.timeit runs two or more warm-up calls before every block, which for a 0.6 s forward would
    # triple the sweep; here each model warms up once, above. Threads are the study's (torch_threads).
    clock = _synchronizing_clock(device)
    timers = {name: timeit.Timer(f, timer=clock) for name, f in forwards.items()}
    meter = ContentionMeter(threads, device)
    times: dict[str, list[float]] = {name: [] for name in names}
    contention: dict[str, list[Contention]] = {name: [] for name in names}
    spent = dict.fromkeys(names, 0.0)
    rounds = 0
    while rounds < min_blocks or min(spent.values()) < min_run_time:
        for k in rng.permutation(len(names)):
            name = names[int(k)]
            with meter.block() as measured:
                per_forward = timers[name].timeit(number[name]) / number[name]
            times[name].append(per_forward)
            contention[name].extend(measured)
            spent[name] += per_forward * number[name]
            if rounds == 0:  # the warm-up's first-call costs overstate a forward: size blocks again
                number[name] = max(1, int(block_s / max(per_forward, 1e-9)))
        rounds += 1
    return Interleaved(
        times=times,
        forwards_per_block=number,
        contention={name: functools.reduce(lambda a, b: a + b, c) for name, c in contention.items()},
    )


# ------------------------------------------------------------------------------------------ one point

LATENCY_QUANTILE = 0.2  # the latency that decides: this quantile of a point's block times (see summarise)


@dataclass(frozen=True)
class CostRow:
    """The cost of one model at one resolution (forward only, batch `batch`)."""

    model: str
    resolution: int  # px per side (square images)
    tokens: int  # patch tokens, (resolution / patch_size)^2, without any class token
    batch: int
    latency_ms: float  # the LATENCY_QUANTILE of latency_ms_blocks: what the fits and the crossover use
    latency_ms_lo: float | None  # its bootstrap interval (None until the study resamples)
    latency_ms_hi: float | None
    latency_ms_median: float  # the median and quartiles of the blocks: their spread
    latency_ms_q25: float
    latency_ms_q75: float
    latency_ms_blocks: tuple[float, ...]  # every timed block's time per forward, in round order
    forwards_per_block: int
    others_cpu: float  # other processes' CPU use during this row's blocks, share of the machine
    own_cpu: float  # this process's CPU use during them, share of what its threads could use
    gpu_other_processes: int | None  # other processes on the GPU during them (NVML), None where unknown
    peak_memory_mb: float  # MiB above the pre-forward baseline, one (deterministic) measurement
    memory_method: str
    flops_counted: int  # FlopCounterMode's total for one forward
    scan_flops: int  # our count of the selective scans, 9*B*L*D*N each
    flops_total: int  # flops_counted + scan_flops, less the scan FLOPs the counter already saw
    attention_entries: int  # per image: sum over attention layers of heads * sequence_length^2

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _in_channels(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "in_channels", 4))  # the study's images: depth + 3 normal channels


def study_input(model: nn.Module, resolution: int, batch: int, device: torch.device) -> torch.Tensor:
    """float32[batch, C, resolution, resolution], the same for every model (seeded)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, _in_channels(model), resolution, resolution, generator=gen).to(device)


def measure_resolution(
    models: dict[str, nn.Module],
    resolution: int,
    patch_size: int,
    rng: np.random.Generator,
    batch: int = 1,
    min_run_time: float = 1.0,
    min_blocks: int = 7,
    threads: int | None = None,
) -> list[CostRow]:
    """Measure every model (already on its device, in eval mode) at `resolution` px: their forwards timed
    together in alternating blocks (`time_interleaved`, order drawn from `rng`), then one forward each
    under FlopCounterMode and one for peak memory. Latency intervals are left None: they come from the
    study's bootstrap."""
    if resolution % patch_size:
        raise ValueError(f"resolution {resolution} is not a multiple of the patch size {patch_size}")
    if batch < 1 or min_blocks < 1 or min_run_time <= 0:
        raise ValueError(
            f"need batch >= 1, min_blocks >= 1, min_run_time > 0; got {batch}, {min_blocks}, {min_run_time}"
        )
    device = next(next(iter(models.values())).parameters()).device
    threads = threads or torch.get_num_threads()
    tokens = (resolution // patch_size) ** 2
    inputs = {name: study_input(model, resolution, batch, device) for name, model in models.items()}

    def forward_of(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
        def forward() -> None:
            with torch.inference_mode():
                model(x)

        return forward

    forwards = {name: forward_of(model, inputs[name]) for name, model in models.items()}
    timed = time_interleaved(forwards, device, min_run_time, min_blocks, threads, rng)
    rows = []
    for name, model in models.items():
        blocks_ms = [t * 1e3 for t in timed.times[name]]
        low, q25, q50, q75 = np.quantile(blocks_ms, [LATENCY_QUANTILE, 0.25, 0.5, 0.75]).tolist()
        counted, scans, total = model_flops(model, inputs[name], tokens)
        memory_mb, method = peak_memory_mb(model, inputs[name])
        busy = timed.contention[name]
        rows.append(
            CostRow(
                model=name,
                resolution=resolution,
                tokens=tokens,
                batch=batch,
                latency_ms=low,
                latency_ms_lo=None,
                latency_ms_hi=None,
                latency_ms_median=q50,
                latency_ms_q25=q25,
                latency_ms_q75=q75,
                latency_ms_blocks=tuple(blocks_ms),
                forwards_per_block=timed.forwards_per_block[name],
                others_cpu=busy.others,
                own_cpu=busy.own,
                gpu_other_processes=busy.gpu_other_processes,
                peak_memory_mb=memory_mb,
                memory_method=method,
                flops_counted=counted,
                scan_flops=scans,
                flops_total=total,
                attention_entries=attention_entries(model, tokens),
            )
        )
    return rows


# ------------------------------------------------------------------------------ exponents and intervals


def loglog_slopes(xs: Sequence[float], ys: Sequence[float]) -> list[float]:
    """Slope of log(y) against log(x) between neighbouring points (n - 1 values): the local exponent."""
    _check_positive(xs, ys)
    return [
        (math.log(ys[i + 1]) - math.log(ys[i])) / (math.log(xs[i + 1]) - math.log(xs[i]))
        for i in range(len(xs) - 1)
    ]


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) on log(x) over all points: k in y ~ x^k."""
    _check_positive(xs, ys)
    return float(_slopes(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)[None, :])[0])


def _check_positive(xs: Sequence[float], ys: Sequence[float]) -> None:
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"need two equally long sequences of >= 2 points; got {len(xs)} and {len(ys)}")
    if min(xs) <= 0 or min(ys) <= 0:
        raise ValueError("log-log slopes need positive values")
    if len(set(xs)) < 2:
        raise ValueError("fit_exponent needs at least two distinct x values")


def _slopes(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Least-squares slope of log(ys[r]) on log(xs) for every row r: xs float[k], ys float[R, k] -> [R]."""
    lx, ly = np.log(xs), np.log(ys)  # [k], [R, k]
    dx = lx - lx.mean()  # [k]
    return (ly - ly.mean(axis=1, keepdims=True)) @ dx / (dx @ dx)  # [R]


def resample_quantiles(
    groups: Sequence[Sequence[float]], q: float, resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """Bootstrap quantiles: float[resamples, len(groups)], column j the q-quantiles of `resamples`
    resamples of groups[j], each drawn with replacement to the group's own size.

    The groups (the block times at each token count) are resampled independently: repeats within a token
    count are exchangeable, the token counts are the fixed design. Seeded by the caller's generator.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1; got {resamples}")
    out = np.empty((resamples, len(groups)))
    for j, group in enumerate(groups):
        values = np.asarray(group, dtype=float)
        if values.size == 0:
            raise ValueError(f"group {j} has no measurements to resample")
        draws = rng.integers(0, values.size, size=(resamples, values.size))  # [R, n_j]
        out[:, j] = np.quantile(values[draws], q, axis=1)
    return out


def resample_medians(
    groups: Sequence[Sequence[float]], resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """`resample_quantiles` at the median."""
    return resample_quantiles(groups, 0.5, resamples, rng)


@dataclass(frozen=True)
class Exponent:
    """k in cost ~ tokens^k (or a difference of two such k), with an interval [lo, hi]."""

    value: float
    lo: float
    hi: float
    tokens: tuple[int, ...]  # the token counts fitted
    interval: str  # how [lo, hi] was obtained

    @classmethod
    def from_samples(
        cls, value: float, samples: np.ndarray, level: float, tokens: Sequence[int], interval: str
    ) -> Exponent:
        """The point estimate with the percentile interval of bootstrap `samples` at `level`."""
        lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2]).tolist()
        return cls(float(value), lo, hi, tuple(int(t) for t in tokens), interval)

    @classmethod
    def point(cls, value: float, tokens: Sequence[int], interval: str) -> Exponent:
        return cls(float(value), float(value), float(value), tuple(int(t) for t in tokens), interval)


def _bootstrap_interval(level: float, resamples: int) -> str:
    return (
        f"{level:.0%} percentile bootstrap, {resamples} resamples of the block times within each token count"
    )


DETERMINISTIC = "none: one measurement per token count, deterministic (the same forward, the same bytes)"
COUNTED = "none: counted, not measured"


def latency_exponent(
    tokens: Sequence[int],
    times: Sequence[Sequence[float]],
    min_tokens: int = 0,
    resamples: int = 2000,
    rng: np.random.Generator | None = None,
    level: float = 0.95,
    q: float = 0.5,
) -> tuple[Exponent, np.ndarray]:
    """Fit k in latency ~ tokens^k over tokens >= min_tokens, the latency at each count being the
    q-quantile of its repeated timings (the median by default), with a bootstrap interval.

    tokens: the swept counts; times: the repeated timings at each. Returns the Exponent and its bootstrap
    samples (float[resamples]) so two models' exponents can be differenced resample by resample.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    resampled = resample_quantiles(times, q, resamples, rng)  # [R, k]
    return _fit_resampled(tokens, times, resampled, min_tokens, level, q)


def _fit_resampled(
    tokens: Sequence[int],
    times: Sequence[Sequence[float]],
    resampled: np.ndarray,
    min_tokens: int,
    level: float,
    q: float = 0.5,
    interval: str | None = None,
) -> tuple[Exponent, np.ndarray]:
    """The log-log slope of the q-quantile of `times` against `tokens` >= min_tokens, and of every row of
    `resampled` (the bootstrap's q-quantiles, float[R, len(tokens)]), with its percentile interval."""
    keep = [j for j, t in enumerate(tokens) if t >= min_tokens]
    if len({tokens[j] for j in keep}) < 2:
        raise ValueError(
            f"fitting over tokens >= {min_tokens} needs two distinct token counts there; the sweep has "
            f"{sorted(tokens)} (lower fit_min_tokens or add resolutions)"
        )
    xs = np.array([tokens[j] for j in keep], dtype=float)
    observed = np.array([[float(np.quantile(times[j], q)) for j in keep]])  # [1, k]
    samples = _slopes(xs, resampled[:, keep])  # [R]
    interval = interval or _bootstrap_interval(level, resampled.shape[0])
    return Exponent.from_samples(_slopes(xs, observed)[0], samples, level, xs, interval), samples


# ------------------------------------------------------------------------------------------- crossover


@dataclass(frozen=True)
class Crossover:
    """Where `model` (pure Mamba) becomes faster than `reference` (ViT) within the sweep."""

    model: str
    reference: str
    # The smallest swept token count from which model's median latency is below reference's, at it and at
    # every larger swept count; None: not within the sweep.
    tokens: int | None
    # Whether at `tokens` the two medians' bootstrap intervals separate (model's hi < reference's lo).
    holds_with_intervals: bool
    # The smallest swept count from which the intervals separate at every larger count; None: nowhere.
    tokens_with_intervals: int | None


def find_crossover(rows: Sequence[CostRow], model: str = "mamba", reference: str = "vit") -> Crossover:
    """The crossover of `model` below `reference` in median latency (a pure function of the rows)."""
    mine = {r.tokens: r for r in rows if r.model == model}
    theirs = {r.tokens: r for r in rows if r.model == reference}
    if not mine or set(mine) != set(theirs):
        raise ValueError(
            f"models {model!r} and {reference!r} need rows at the same token counts; got "
            f"{sorted(mine)} and {sorted(theirs)}"
        )

    def separated(t: int) -> bool:
        a, b = mine[t], theirs[t]
        if a.latency_ms_hi is None or b.latency_ms_lo is None:
            raise ValueError(f"row {model!r} at {t} tokens has no latency interval yet")
        return a.latency_ms_hi < b.latency_ms_lo

    def first_from(holds: Callable[[int], bool]) -> int | None:
        first = None
        for t in sorted(mine, reverse=True):  # walk down from the largest count while it holds
            if not holds(t):
                break
            first = t
        return first

    tokens = first_from(lambda t: mine[t].latency_ms < theirs[t].latency_ms)
    return Crossover(
        model=model,
        reference=reference,
        tokens=tokens,
        holds_with_intervals=tokens is not None and separated(tokens),
        tokens_with_intervals=first_from(separated),
    )


# ------------------------------------------------------------------------------------------ the study


@dataclass(frozen=True)
class ModelFit:
    """One model's exponents: over tokens >= fit_min_tokens, and (`_full`) over the whole sweep."""

    latency: Exponent
    memory: Exponent
    latency_full: Exponent
    memory_full: Exponent
    flops: Exponent  # counted FLOPs, context only
    latency_slopes: tuple[float, ...]  # local log-log slopes of the medians between neighbouring counts
    memory_slopes: tuple[float, ...]


@dataclass(frozen=True)
class Busiest:
    """The busiest the machine was while the fitted rows were timed: the row whose blocks saw the most
    CPU use by other processes, and the most other processes seen on the GPU."""

    others_cpu: float  # share of the machine's CPU time other processes used, 0..1
    model: str
    tokens: int
    gpu_other_processes: int | None  # None where NVML could not say (or on CPU)


@dataclass(frozen=True)
class CostStudy:
    rows: tuple[CostRow, ...]  # (resolution, model) order
    fits: dict[str, ModelFit]  # by model
    # <model> latency exponent minus pure Mamba's, for every other model, from their per-round ratios
    latency_gaps: dict[str, Exponent]
    crossover: Crossover  # pure Mamba below ViT (fused)
    busiest: Busiest
    setting: dict[str, Any]
    wall_s: float  # the whole study, measuring and resampling

    @property
    def latency_gap(self) -> Exponent:
        """ViT (fused) minus pure Mamba latency exponent over the upper sweep."""
        return self.latency_gaps["vit"]

    @property
    def crossover_tokens(self) -> int | None:
        return self.crossover.tokens

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable: rows, fits, gaps, crossover, setting, the essay's table and the wall time."""
        return {
            "setting": dict(self.setting),
            "rows": [r.as_dict() for r in self.rows],
            "fits": {name: asdict(fit) for name, fit in self.fits.items()},
            "latency_gap": asdict(self.latency_gap),
            "latency_gaps": {name: asdict(gap) for name, gap in self.latency_gaps.items()},
            "crossover": asdict(self.crossover),
            "crossover_tokens": self.crossover_tokens,
            "busiest": asdict(self.busiest),
            "essay": essay_rows(),
            "wall_s": self.wall_s,
        }


def _point_fit(rows: Sequence[CostRow], key: str, interval: str) -> Exponent:
    """The exponent of one deterministic number per row (memory, FLOPs): its interval is the point."""
    tokens = [r.tokens for r in rows]
    return Exponent.point(fit_exponent(tokens, [getattr(r, key) for r in rows]), tokens, interval)


def default_cost_models(
    dim: int,
    depth: int,
    heads: int,
    num_classes: int = 8,
    in_channels: int = 4,
    patch_size: int = 16,
    image_size: int = 224,
    seed: int = 0,
) -> dict[str, Callable[[], nn.Module]]:
    """Factories for "vit", "vit_explicit", "mamba_hybrid" and "mamba" (attn_layers=0), one width and depth.

    vit_explicit is vit with explicit softmax attention; both are built from `seed`, so they have the same
    weights. The hybrid puts max(1, depth // 4) attention blocks after its Mamba blocks (the registry's
    tiny size is 1 in 4; MambaVision also uses a minority of attention blocks, last), but always keeps one
    Mamba block. `image_size` is ViT's training grid; other resolutions resample its position embedding.
    Building does not touch the global RNG.
    """
    if depth < 2:
        raise ValueError(f"depth must be >= 2 so the hybrid has both block kinds; got {depth}")
    common = {"dim": dim, "depth": depth, "heads": heads, "patch_size": patch_size}
    common |= {"num_classes": num_classes, "in_channels": in_channels}
    hybrid_attn = min(max(1, depth // 4), depth - 1)

    def seeded(family: str, **hparams: Any) -> Callable[[], nn.Module]:
        def factory() -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return build(family, **common, **hparams)

        return factory

    return {
        "vit": seeded("vit", image_size=image_size),
        "vit_explicit": seeded("vit", image_size=image_size, fused_attention=False),
        "mamba_hybrid": seeded("mamba_hybrid", attn_layers=hybrid_attn),
        "mamba": seeded("mamba_hybrid", attn_layers=0),
    }


CPU_RESOLUTIONS = (128, 224, 384, 512, 1024)  # 64 .. 4096 tokens at patch 16: 64x, 1-1.5 min on 2 cores
GPU_RESOLUTIONS = (*CPU_RESOLUTIONS, 2048)  # + 16384 tokens (explicit attention: 3.2 GB per head-matrix set)


def default_resolutions(device: torch.device) -> tuple[int, ...]:
    return GPU_RESOLUTIONS if device.type == "cuda" else CPU_RESOLUTIONS


def cost_study(
    dim: int,
    depth: int,
    heads: int,
    patch_size: int,
    resolutions: Sequence[int],
    device: torch.device,
    bootstrap_seed: int,
    resamples: int,
    progress: Callable[[str], None] | None = None,
    *,
    threads: int | None = None,
    min_run_time: float = 1.0,
    min_blocks: int = 7,
    fit_min_tokens: int = 576,
    level: float = 0.95,
    models: dict[str, Callable[[], nn.Module]] | None = None,
) -> CostStudy:
    """Measure every model (`default_cost_models` unless `models` is given) at every resolution, batch 1,
    and fit the exponents, the ViT - Mamba gap and the crossover.

    Models are built once; at each resolution they are timed together in alternating short blocks
    (`measure_resolution`, the models' order in each round drawn from a generator seeded by
    `bootstrap_seed`), so that load that comes and goes hits them alike. `threads` (default: torch's
    current number) is set for the whole study and restored after. `min_run_time` is each point's timing
    budget in seconds, `min_blocks` the number of rounds a slow point still gets (see `time_interleaved`).
    The numbers are then summarised by `summarise` (bootstrap seeded by `bootstrap_seed`).
    """
    if models is None:
        models = default_cost_models(dim=dim, depth=depth, heads=heads, patch_size=patch_size)
    for key in ("vit", "mamba"):
        if key not in models:
            raise ValueError(f"cost_study needs a model named {key!r}; got {sorted(models)}")
    for resolution in resolutions:
        if resolution % patch_size:
            raise ValueError(f"resolution {resolution} is not a multiple of the patch size {patch_size}")
    fitted = {t for t in ((r // patch_size) ** 2 for r in resolutions) if t >= fit_min_tokens}
    if len(fitted) < 2:
        raise ValueError(
            f"fit_min_tokens = {fit_min_tokens} leaves {len(fitted)} token count(s) of resolutions "
            f"{list(resolutions)} at patch {patch_size} to fit; need at least 2"
        )
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    began = time.monotonic()
    threads = threads or torch.get_num_threads()
    resolutions = sorted(set(resolutions))
    rows: list[CostRow] = []
    with torch_threads(threads):
        built = {name: factory().to(device).eval() for name, factory in models.items()}
        order = np.random.default_rng([bootstrap_seed, 0xB10C])  # the models' order in every round
        for resolution in resolutions:
            point = measure_resolution(
                built, resolution, patch_size, order, 1, min_run_time, min_blocks, threads
            )
            rows.extend(point)
            for row in point if progress is not None else ():
                progress(
                    f"cost {row.model} {resolution}px ({row.tokens} tokens): {row.latency_ms:.1f} ms "
                    f"(median {row.latency_ms_median:.1f}, IQR {row.latency_ms_q25:.1f}-"
                    f"{row.latency_ms_q75:.1f}, {len(row.latency_ms_blocks)} blocks; other processes "
                    f"{row.others_cpu:.0%} of the CPUs), {row.peak_memory_mb:.1f} MiB, "
                    f"{row.flops_total / 1e9:.2f} GFLOP"
                )
        del built

    setting = {
        "dim": dim,
        "depth": depth,
        "heads": heads,
        "patch_size": patch_size,
        "resolutions": list(resolutions),
        "batch": 1,
        "models": list(models),
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        ),
        "threads": threads,
        # what backend "auto" runs on this device
        "scan_backend": resolve_backend("auto", device),
        "torch": torch.__version__,
        "timer": "alternating blocks of timeit runs, one warm-up forward each; rounds in a seeded order",
        "latency_statistic": f"{LATENCY_QUANTILE:g}-quantile of the block times",
        "min_run_time_s": min_run_time,
        "min_blocks": min_blocks,
        "fit_min_tokens": fit_min_tokens,
        "level": level,
        "bootstrap_seed": bootstrap_seed,
        "resamples": resamples,
    }
    study = summarise(rows, setting, bootstrap_seed, resamples, fit_min_tokens, level)
    return replace(study, wall_s=time.monotonic() - began)


def summarise(
    rows: Sequence[CostRow],
    setting: dict[str, Any],
    bootstrap_seed: int,
    resamples: int,
    fit_min_tokens: int = 576,
    level: float = 0.95,
) -> CostStudy:
    """The study from measured rows (a pure function of them and the seed): every row's median interval,
    every model's exponents, each model's latency exponent minus pure Mamba's, and the crossover.

    One bootstrap per model, its generator seeded by (bootstrap_seed, the model's name), so a model's
    intervals do not depend on which other models are in the rows. The rows need models "mamba" and
    "vit"; wall_s is left 0.
    """
    models = list(dict.fromkeys(r.model for r in rows))
    if "mamba" not in models:
        raise ValueError(f"the rows need a model named 'mamba' to compare against; got {models}")
    fits, with_intervals = {}, {}
    q = LATENCY_QUANTILE
    for name in models:
        mine = sorted((r for r in rows if r.model == name), key=lambda r: r.tokens)
        tokens = [r.tokens for r in mine]
        times = [r.latency_ms_blocks for r in mine]
        rng = np.random.default_rng([bootstrap_seed, *name.encode()])
        lows = resample_quantiles(times, q, resamples, rng)  # [R, token counts]
        lo, hi = np.quantile(lows, [(1 - level) / 2, (1 + level) / 2], axis=0).tolist()
        for row, a, b in zip(mine, lo, hi, strict=True):
            with_intervals[(name, row.tokens)] = replace(row, latency_ms_lo=a, latency_ms_hi=b)
        interval = f"{_bootstrap_interval(level, resamples)}, of their {q:g}-quantile"
        latency, _ = _fit_resampled(tokens, times, lows, fit_min_tokens, level, q, interval)
        latency_full, _ = _fit_resampled(tokens, times, lows, 0, level, q, interval)
        upper = [r for r in mine if r.tokens >= fit_min_tokens]
        fits[name] = ModelFit(
            latency=latency,
            memory=_point_fit(upper, "peak_memory_mb", DETERMINISTIC),
            latency_full=latency_full,
            memory_full=_point_fit(mine, "peak_memory_mb", DETERMINISTIC),
            flops=_point_fit(upper, "flops_total", COUNTED),
            latency_slopes=tuple(loglog_slopes(tokens, [r.latency_ms for r in mine])),
            memory_slopes=tuple(loglog_slopes(tokens, [r.peak_memory_mb for r in mine])),
        )
    rows = [with_intervals[(r.model, r.tokens)] for r in rows]
    gaps = {
        name: latency_ratio_exponent(rows, name, "mamba", bootstrap_seed, resamples, fit_min_tokens, level)
        for name in models
        if name != "mamba"
    }
    return CostStudy(
        rows=tuple(rows),
        fits=fits,
        latency_gaps=gaps,
        crossover=find_crossover(rows, "mamba", "vit"),
        busiest=busiest(rows, fit_min_tokens),
        setting=dict(setting),
        wall_s=0.0,
    )


def latency_ratio_exponent(
    rows: Sequence[CostRow],
    model: str,
    reference: str,
    bootstrap_seed: int,
    resamples: int,
    fit_min_tokens: int = 576,
    level: float = 0.95,
) -> Exponent:
    """k(model) - k(reference), fitted from their per-round latency ratios: the log-log slope of the median
    ratio against tokens over tokens >= fit_min_tokens, with a bootstrap that resamples the rounds within
    each token count.

    Block j of both models at one token count was timed in round j, one right after the other in a random
    order, so a slowdown of the machine that lasts a round multiplies both and cancels in their ratio; the
    median of the ratios is not moved by the few rounds that load hit unevenly.
    """
    mine = sorted((r for r in rows if r.model == model), key=lambda r: r.tokens)
    theirs = {r.tokens: r for r in rows if r.model == reference}
    tokens = [r.tokens for r in mine]
    if set(tokens) != set(theirs):
        raise ValueError(f"models {model!r} and {reference!r} need rows at the same token counts")
    ratios = []
    for row in mine:
        other = theirs[row.tokens].latency_ms_blocks
        if len(other) != len(row.latency_ms_blocks):
            raise ValueError(
                f"{model!r} and {reference!r} at {row.tokens} tokens were not timed in the same rounds"
            )
        ratios.append([a / b for a, b in zip(row.latency_ms_blocks, other, strict=True)])
    rng = np.random.default_rng([bootstrap_seed, *f"{model}/{reference}".encode()])
    medians = resample_medians(ratios, resamples, rng)  # [R, token counts]
    interval = (
        f"{level:.0%} percentile bootstrap, {resamples} resamples of the rounds within each token count, "
        f"of the median per-round latency ratio {model} / {reference}"
    )
    return _fit_resampled(tokens, ratios, medians, fit_min_tokens, level, 0.5, interval)[0]


def busiest(rows: Sequence[CostRow], fit_min_tokens: int = 0) -> Busiest:
    """The row of tokens >= fit_min_tokens during whose blocks other processes used the most CPU, and the
    most other GPU processes seen."""
    fitted = [r for r in rows if r.tokens >= fit_min_tokens] or list(rows)
    worst = max(fitted, key=lambda r: r.others_cpu)
    gpu = [r.gpu_other_processes for r in fitted if r.gpu_other_processes is not None]
    return Busiest(worst.others_cpu, worst.model, worst.tokens, max(gpu) if gpu else None)
