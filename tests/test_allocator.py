"""perception.allocator: freed blocks stay in the process for reuse, what a model computes does not change,
and benchmarks.allocator times both ways."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

import perception.allocator as allocator
from tests.conftest import REPO

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# In a fresh process: a 64 MiB tensor made and freed, and where malloc put it (glibc's mallinfo2: `hblkhd`
# is the bytes in mmapped blocks, `arena` the bytes of the heaps).
_WHERE_IT_WENT = """
import ctypes, json, sys
import torch
from perception.allocator import keep_freed_blocks

class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(name, ctypes.c_size_t) for name in names.split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
threshold = keep_freed_blocks() if sys.argv[1] == "kept" else 0
before = libc.mallinfo2()
block = torch.ones(16 << 20)  # 64 MiB
held = libc.mallinfo2()
del block
freed = libc.mallinfo2()
print(json.dumps({"threshold": threshold, "mmapped_held": held.hblkhd - before.hblkhd,
                  "heap_held": held.arena - before.arena, "heap_after_free": freed.arena - before.arena}))
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_kept_blocks_come_from_the_heap_and_stay_there_once_freed():
    def where(way: str) -> dict:
        done = subprocess.run(
            [sys.executable, "-c", _WHERE_IT_WENT, way], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    default, kept = where("default"), where("kept")
    mib = 1 << 20
    # Default: a fresh mmap, given back when freed; nothing stays in the heap.
    assert default["threshold"] == 0 and default["mmapped_held"] >= 64 * mib
    assert default["heap_after_free"] < 64 * mib
    # Kept: from the heap, and the heap keeps it for the next step.
    assert kept["threshold"] == allocator.KEPT_BLOCK_BYTES
    assert kept["mmapped_held"] < mib and kept["heap_held"] >= 64 * mib
    assert kept["heap_after_free"] >= 64 * mib


def test_a_c_library_other_than_glibc_is_left_as_it_is(monkeypatch):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.keep_freed_blocks() == 0


# In a fresh process: two training steps of a small PointNet, the weights' bytes hashed.
_TRAINED_WEIGHTS = """
import hashlib, sys
import torch
from perception.allocator import keep_freed_blocks
from perception.models import build

if sys.argv[1] == "kept":
    keep_freed_blocks()
torch.manual_seed(0)
torch.set_num_threads(1)
model = build("pointnet", num_classes=5, dim=1024)  # 32 x 1024 x 192 features: 25 MB blocks
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
clouds, labels = torch.randn(32, 192, 3), torch.randint(0, 5, (32,))
for _ in range(2):
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(clouds), labels).backward()
    optimizer.step()
digest = hashlib.sha256()
for tensor in model.state_dict().values():
    digest.update(tensor.numpy().tobytes())
print(digest.hexdigest())
"""


def test_what_a_model_computes_does_not_depend_on_where_its_memory_comes_from():
    def weights(way: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", _TRAINED_WEIGHTS, way],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert weights("default") == weights("kept")


def test_the_benchmark_times_both_ways_in_fresh_processes_and_reports_their_ratios(params, tmp_path):
    out = tmp_path / "allocator.json"
    command = [sys.executable, "-m", "benchmarks.allocator", "pointnet-none", "--params", str(params)]
    command += ["--epochs", "1", "--repeats", "1", "--data", str(tmp_path / "data"), "--json", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(out.read_text())["variants"]
    assert row["variant"] == "pointnet-none"
    assert row["default_s"] > 0 and row["kept_s"] > 0 and row["default_peak_mib"] > 0
    assert row["speedup"] == pytest.approx(row["default_s"] / row["kept_s"], abs=1e-3)
    assert row["memory_ratio"] == pytest.approx(row["kept_peak_mib"] / row["default_peak_mib"], abs=1e-3)
    assert f"x{row['speedup']:.2f}" in done.stdout
