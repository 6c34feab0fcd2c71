"""The CPU this runs on, as the kernel cache keys it and as a report names it beside a latency."""

from __future__ import annotations

import contextlib
import functools
import platform
from pathlib import Path

import torch


@functools.cache
def cpu_fields(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first CPU's fields in `cpuinfo` (Linux's /proc/cpuinfo), by lower-cased name: `model name` and
    `flags` on x86, `cpu part` and `features` on ARM. Empty where there is no such file."""
    with contextlib.suppress(OSError):
        first = cpuinfo.read_text(errors="replace").split("\n\n")[0]
        pairs = (line.partition(":") for line in first.splitlines())
        return {name.strip().lower(): value.strip() for name, _, value in pairs if name.strip()}
    return {}


def cpu_signature(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """What `-march=native` compiles for: the first CPU's model and instruction-set extensions, else the
    platform's processor name."""
    fields = cpu_fields(cpuinfo)
    named = [
        f"{name}: {fields[name]}"
        for name in ("model name", "flags", "cpu part", "features", "isa")
        if name in fields
    ]
    return "\n".join(named) or platform.processor()


def processor_name() -> str:
    """The CPU as a reader would name it beside a latency: its model (where the system says it), its
    architecture, and the widest vector instructions torch's kernels run here (AVX512, AVX2, ...:
    `torch.backends.cpu.get_cpu_capability`). At another width the same models run at another speed and
    round differently, so runs on machines that differ here are not compared."""
    model = cpu_fields().get("model name") or platform.processor()
    parts = [model, platform.machine(), torch.backends.cpu.get_cpu_capability()]
    return ", ".join(part for part in parts if part and part != "DEFAULT")
