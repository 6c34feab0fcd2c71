"""The CPU this runs on: the signature the C kernels' cache is keyed by, and the name a latency is given."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from perception import machine

X86 = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 {extra}\n"
    "bugs\t\t: sysret_ss_attrs\n\nprocessor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2\n"
)
ARM = "processor\t: 0\nFeatures\t: fp asimd sve\nCPU part\t: 0xd40\n\nprocessor\t: 1\nFeatures\t: fp\n"


def cpuinfo_file(folder: Path, name: str, text: str) -> Path:
    """A /proc/cpuinfo of our own, in Linux's layout."""
    path = folder / name
    path.write_text(text)
    return path


def test_the_signature_is_the_first_cpus_model_and_extensions(tmp_path: Path) -> None:
    avx2 = machine.cpu_signature(cpuinfo_file(tmp_path, "avx2", X86.format(extra="")))
    assert avx2 == "model name: AMD EPYC\nflags: fpu sse2 avx2"
    assert machine.cpu_signature(cpuinfo_file(tmp_path, "avx512", X86.format(extra="avx512f"))) != avx2
    arm = machine.cpu_signature(cpuinfo_file(tmp_path, "arm", ARM))
    assert arm == "cpu part: 0xd40\nfeatures: fp asimd sve"
    assert machine.cpu_signature(tmp_path / "absent") == platform.processor()


def test_a_latency_names_the_cpu_and_the_vector_width_torch_runs_at() -> None:
    name = machine.processor_name()
    assert platform.machine() in name
    width = torch.backends.cpu.get_cpu_capability()  # AVX512, AVX2, ... ("DEFAULT": none named)
    assert (width in name) == (width != "DEFAULT"), name
