"""The C kernels' on-disk cache: one build per CPU, so that a cache shared by machines (a home folder on
shared storage, or VMs that all answer to one hostname) never hands a machine code built for another."""

from __future__ import annotations

import ctypes
import shutil
from pathlib import Path

import pytest

from perception import machine
from perception.ops import native
from tests.test_machine import X86, cpuinfo_file

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler here"
)

SOURCE = "int answer(void) { return 42; }\n"


def _library_files(cache: Path) -> set[str]:
    return {path.name for path in cache.glob("kernel_*.so")}


def test_a_cache_shared_by_two_cpus_builds_once_for_each(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "kernels"
    monkeypatch.setenv("PERCEPTION_KERNEL_CACHE", str(cache))
    # One hostname, two CPUs: the AVX-512 machine's build must not be the AVX2 machine's.
    cpus = {
        "avx2": machine.cpu_signature(cpuinfo_file(tmp_path, "avx2", X86.format(extra=""))),
        "avx512": machine.cpu_signature(cpuinfo_file(tmp_path, "avx512", X86.format(extra="avx512f"))),
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
