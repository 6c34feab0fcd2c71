"""C kernels compiled on first use with the machine's C compiler, cached on disk, and called through ctypes.

`compiled_library` builds one source with its flags into a shared library, once per machine and CPU, in a
cache only this user can write; `run_parts` splits a call over contiguous ranges of its work, one per torch
thread (ctypes drops the GIL, so they run in parallel); `Kernel` loads one source once per process, or warns
and lets its caller take the reference path. Used by the selective scan (`perception.ops.scan.native`), e3nn's
tensor product (`perception.ops.tensor_product`), DGCNN's neighbour max (`perception.ops.neighbour_reduce`),
the k nearest neighbours (`perception.ops.graphs.smallest_k`) and Mamba's causal convolution
(`perception.ops.causal_conv`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from perception.machine import cpu_signature

FLAGS = (
    "-O3", "-march=native", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math",
    "-fassociative-math", "-fno-signed-zeros", "-ffp-contract=fast",
)  # fmt: skip
# For a kernel whose float results must round as torch's do, step by step: no fused multiply-adds, no
# reassociation (farthest point sampling, whose picks compare distances).
STRICT_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=off")
FASTMATH = Path(__file__).with_name("fastmath.h")  # vectorisable exp, sigmoid, softplus for the kernels
_pool: ThreadPoolExecutor | None = None


def compiled_library(source: str, flags: tuple[str, ...] = FLAGS) -> ctypes.CDLL:
    """`source` compiled with `flags` (once per machine: cached on disk, per CPU) and loaded.

    The cache is ~/.cache/perception-study/kernels (or $XDG_CACHE_HOME's, or $PERCEPTION_KERNEL_CACHE).
    Raises RuntimeError without a C compiler, subprocess.CalledProcessError (its stderr says why) when the
    compiler fails, OSError when the library does not load."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    # The key covers the source, flags and CPU: -march=native code must not cross CPUs, and a cache that
    # travels (a home folder on shared storage, or VMs that all answer to one hostname) would otherwise
    # hand an AVX-512 build to an AVX2 machine, which dies of an illegal instruction.
    key = "\n".join((source, cc, *flags, platform.node(), platform.machine(), cpu_signature()))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    # A cache only this user can write: a shared /tmp would let another account plant a library here.
    home_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    default = home_cache / "perception-study" / "kernels"
    cache = Path(os.environ.get("PERCEPTION_KERNEL_CACHE") or default)
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    so = cache / f"kernel_{digest}.so"
    if not so.exists():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src, out = Path(tmp) / "kernel.c", Path(tmp) / so.name
            src.write_text(source)
            subprocess.run([cc, *flags, str(src), "-o", str(out)], check=True, capture_output=True)
            os.replace(out, so)  # atomic: concurrent processes never load a half-written library
    return ctypes.CDLL(str(so))


class Kernel:
    """A C source beside its Python module, compiled and loaded on first use, once per process.

    `signatures`: function name -> its argument types (each returns void); `prefix`: text put before the
    source (a `#define` for a compile-time size), then the text of each of `headers` (shared inline code,
    such as `fastmath.h`: the compiled text is one file, so it cannot #include its neighbours).
    `flags`: the compiler's (`FLAGS`, or `STRICT_FLAGS` where floats must round as torch rounds them).
    `library()` is the loaded library, or None, with one warning naming `fallback`, where it cannot be
    built (no compiler); the callers then take their reference path."""

    def __init__(
        self,
        source: Path,
        signatures: dict[str, list],
        fallback: str,
        prefix: str = "",
        headers: tuple[Path, ...] = (),
        flags: tuple[str, ...] = FLAGS,
    ) -> None:
        self.source, self.signatures, self.fallback, self.prefix = source, signatures, fallback, prefix
        self.headers, self.flags = headers, flags
        self._lib: ctypes.CDLL | None = None
        self.error: str | None = None

    def library(self) -> ctypes.CDLL | None:
        if self._lib is None and self.error is None:
            try:
                text = "".join(path.read_text() for path in (*self.headers, self.source))
                lib = compiled_library(self.prefix + text, self.flags)
                for name, argtypes in self.signatures.items():
                    function = getattr(lib, name)
                    function.argtypes, function.restype = argtypes, None
                self._lib = lib
            except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
                self.error = failure_text(e)
                warnings.warn(f"{self.source.name} unavailable, {self.fallback}: {self.error}", stacklevel=3)
        return self._lib

    def available(self) -> bool:
        """Whether the kernel compiles and loads here (it needs a C compiler); no warning."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.library() is not None

    def loaded(self) -> ctypes.CDLL:
        """The library, for a caller that already checked `library()`."""
        lib = self.library()
        if lib is None:
            raise RuntimeError(f"{self.source.name} unavailable: {self.error}")
        return lib


def pointer(tensor: torch.Tensor | None) -> ctypes.c_void_p:
    """A tensor's data for a kernel argument (NULL for None)."""
    return ctypes.c_void_p(None if tensor is None else tensor.data_ptr())


def failure_text(error: Exception) -> str:
    """One line of what `compiled_library` raised, with the compiler's stderr where there is one."""
    detail = getattr(error, "stderr", b"") or b""
    return f"{error} {detail.decode(errors='replace')[:500]}".strip()


def run_parts(
    fn, total: int, args: list, per_part: Callable[[int], list] = lambda i: [], align: int = 1
) -> int:
    """Run fn(*args, *per_part(i), start, stop) over contiguous ranges of [0, total), one per torch thread,
    each range's start a multiple of `align`. ctypes drops the GIL during the call, so the parts run in
    parallel on a small thread pool. Returns the number of parts."""
    global _pool
    parts = max(1, min(torch.get_num_threads(), -(-total // align)))
    bounds = [min(total, (total * i // parts) // align * align) for i in range(parts)] + [total]
    calls = [(*args, *per_part(i), bounds[i], bounds[i + 1]) for i in range(parts)]
    if parts == 1:
        fn(*calls[0])
        return 1
    if _pool is None or _pool._max_workers < parts - 1:
        _pool = ThreadPoolExecutor(max_workers=max(parts - 1, os.cpu_count() or 1))
    futures = [_pool.submit(fn, *call) for call in calls[1:]]
    fn(*calls[0])
    for f in futures:
        f.result()
    return parts
