"""Timing: models in alternating short blocks, and the contention measured during each block."""

from __future__ import annotations

import contextlib
import functools
import os
import time
import timeit
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import psutil
import torch

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
