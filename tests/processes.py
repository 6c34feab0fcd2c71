"""Work for the processes tests/test_side_by_side.py spawns: only pipeline.parallel is imported, so that a
spawned process starts in a fraction of a second."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline.parallel import cpu_slots, locked


def hold(path: str, seconds: float) -> None:
    with locked(Path(path)):
        time.sleep(seconds)


def trial(folder: str, log: str, seconds: float) -> None:
    with cpu_slots(1, Path(folder), poll_s=0.02):
        began = time.monotonic()
        time.sleep(seconds)
        with open(log, "a") as handle:
            handle.write(f"{began} {time.monotonic()}\n")


def take(folder: str, cores: int, log: str) -> None:
    Path(log + ".asking").touch()
    with cpu_slots(cores, Path(folder), poll_s=0.01) as waited:
        Path(log).write_text(str(waited))


def hog(folder: str, seconds: float) -> None:
    """Trials one after another in one process, as a reused Ray worker runs them: each frees its core and
    at once asks for it again."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with cpu_slots(1, Path(folder), poll_s=0.5):
            time.sleep(0.2)


def wait_for_core(folder: str, log: str) -> None:
    with cpu_slots(1, Path(folder), poll_s=0.5):
        Path(log).write_text(str(time.monotonic()))


def square_in(x: int) -> tuple[int, int]:
    """x squared, and the process that computed it."""
    return x * x, os.getpid()
