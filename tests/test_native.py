"""The C kernels' on-disk cache: one build per CPU, so that a cache shared by machines (a home folder on
shared storage, or VMs that all answer to one hostname) never hands a machine code built for another."""

from __future__ import annotations

import ctypes
import platform
import shutil
from pathlib import Path

import pytest
import torch

from perception import machine
from perception.ops import native

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler here"
)

SOURCE = "int answer(void) { return 42; }\n"
X86 = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 {extra}\n"
    "bugs\t\t: sysret_ss_attrs\n\nprocessor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2\n"
)
ARM = "processor\t: 0\nFeatures\t: fp asimd sve\nCPU part\t: 0xd40\n\nprocessor\t: 1\nFeatures\t: fp\n"


def _cpuinfo(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_signature_is_the_first_cpus_model_and_extensions(tmp_path: Path) -> None:
    avx2 = machine.cpu_signature(_cpuinfo(tmp_path, "avx2", X86.format(extra="")))
    assert avx2 == "model name: AMD EPYC\nflags: fpu sse2 avx2"
    assert machine.cpu_signature(_cpuinfo(tmp_path, "avx512", X86.format(extra="avx512f"))) != avx2
    arm = machine.cpu_signature(_cpuinfo(tmp_path, "arm", ARM))
    assert arm == "cpu part: 0xd40\nfeatures: fp asimd sve"
    assert machine.cpu_signature(tmp_path / "absent") == platform.processor()


def _library_files(cache: Path) -> set[str]:
    return {path.name for path in cache.glob("kernel_*.so")}


def test_a_cache_shared_by_two_cpus_builds_once_for_each(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "kernels"
    monkeypatch.setenv("PERCEPTION_KERNEL_CACHE", str(cache))
    # One hostname, two CPUs: the AVX-512 machine's build must not be the AVX2 machine's.
    cpus = {
        "avx2": machine.cpu_signature(_cpuinfo(tmp_path, "avx2", X86.format(extra=""))),
        "avx512": machine.cpu_signature(_cpuinfo(tmp_path, "avx512", X86.format(extra="avx512f"))),
    }
    built = {}
    for name, signature in cpus.items():
        monkeypatch.setattr(native, "cpu_signature", lambda signature=signature: signature)
        lib = native.compiled_library(SOURCE)
        lib.answer.restype = ctypes.c_int
        assert lib.answer() == 42
        built[name] = _library_files(cache)
    assert len(built["avx2"]) == 1 and len(built["avx512"]) == 2, built

    # Back on the first CPU: its own build is found again, nothing is compiled.
    monkeypatch.setattr(native, "cpu_signature", lambda: cpus["avx2"])
    native.compiled_library(SOURCE)
    assert _library_files(cache) == built["avx512"]


def test_a_latency_names_the_cpu_and_the_vector_width_torch_runs_at() -> None:
    name = machine.processor_name()
    assert platform.machine() in name
    width = torch.backends.cpu.get_cpu_capability()  # AVX512, AVX2, ... ("DEFAULT": none named)
    assert (width in name) == (width != "DEFAULT"), name
