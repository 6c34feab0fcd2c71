"""Claim 3 on a busy machine: a small cost sweep timed beside a real CPU burner (bounded processes on the
same cores that stop by themselves) measures the contention, and the verdict never holds with a reversed
interval: it is the quiet run's verdict, or inconclusive because the machine was busy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from perception.evaluation.cost import CostStudy, cost_study, torch_threads
from pipeline.evaluation import verdicts as v
from pipeline.evaluation.evidence import cost_evidence

# Each burner spins for at most this many iterations or 120 s, whichever ends first; the test kills it when
# the sweep is done.
BURNER = """
import sys, time
deadline, x = time.monotonic() + 120, 0
for i in range(int(sys.argv[1])):
    x += i * i
    if i % 100_000 == 0 and time.monotonic() > deadline:
        break
"""
ITERATIONS = 3_000_000_000


def _sweep() -> CostStudy:
    with torch_threads(os.cpu_count() or 1):
        return cost_study(
            dim=32, depth=2, heads=2, patch_size=8, resolutions=(32, 64, 128), device=torch.device("cpu"),
            bootstrap_seed=0, resamples=300, min_run_time=0.3, min_blocks=5, fit_min_tokens=16,
        )  # fmt: skip


def _verdict(study: CostStudy) -> v.Verdict:
    return v.claim_cost(cost_evidence(study.as_dict()))


@pytest.fixture(scope="module")
def quiet() -> CostStudy:
    return _sweep()


@pytest.fixture(scope="module")
def loaded() -> CostStudy:
    burners = [
        subprocess.Popen([sys.executable, "-c", BURNER, str(ITERATIONS)]) for _ in range(os.cpu_count() or 1)
    ]
    try:
        study = _sweep()
        still_burning = [b.poll() is None for b in burners]
    finally:
        for burner in burners:  # they would stop by themselves; no need to wait for it
            burner.kill()
            burner.wait()
    assert all(still_burning), "a burner ended before the sweep did: the load did not last"
    return study


def test_contention_is_near_zero_on_a_quiet_machine(quiet):
    assert quiet.busiest.others_cpu < 0.1, quiet.busiest
    assert v.busy(cost_evidence(quiet.as_dict())) is None


def test_contention_is_measured_well_above_the_threshold_beside_a_burner(loaded):
    assert loaded.busiest.others_cpu > 2 * v.BUSY_CPU_THRESHOLD, loaded.busiest
    assert all(row.others_cpu > v.BUSY_CPU_THRESHOLD for row in loaded.rows)


def test_under_load_the_verdict_is_the_quiet_one_or_inconclusive_because_busy(quiet, loaded):
    calm, busy = _verdict(quiet), _verdict(loaded)
    if busy.verdict != calm.verdict:
        assert busy.verdict == v.INCONCLUSIVE
        assert "the machine was busy during timing" in busy.excluded[0]
    if busy.verdict == v.HOLDS:  # never holds with a reversed or wrong-signed interval
        assert busy.effect.lo > 0
    # Here the load is heavy enough that the gate speaks, whatever the timings said.
    assert busy.verdict == v.INCONCLUSIVE and "other processes used" in busy.excluded[0]
