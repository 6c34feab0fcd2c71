"""pipeline.evidence: per-sample correctness arrays in, the estimates a verdict judges (synthetic data)."""

from __future__ import annotations

import numpy as np
import pytest

from perception.evaluation.intervals import BootstrapSettings
from pipeline import verdicts as v
from pipeline.evidence import VariantInfo, model_fits, rotation_evidence, rotation_tables

SETTINGS = BootstrapSettings(resamples=400, seed=0)
SEEDS, CLOUDS, DRAWS = 3, 200, 2


def _correct(accuracy: float, seed: int) -> np.ndarray:
    """bool[S, N, D]: each (seed, cloud, draw) right with probability `accuracy`."""
    return np.random.default_rng(seed).random((SEEDS, CLOUDS, DRAWS)) < accuracy


def _study(e3nn_accuracy: float) -> tuple[dict, dict]:
    """Two un-augmented baselines that fail under SO(3) and an e3nn model that does not."""
    accuracies = {  # variant -> (none, z, so3)
        "pointnet-none": (0.85, 0.6, 0.2),
        "dgcnn": (0.9, 0.7, 0.3),
        "e3nn": (e3nn_accuracy, e3nn_accuracy, e3nn_accuracy),
    }
    correct = {
        name: {
            mode: _correct(a, 10 * i + j)
            for j, (mode, a) in enumerate(zip(("none", "z", "so3"), acc, strict=True))
        }
        for i, (name, acc) in enumerate(accuracies.items())
    }
    infos = {name: VariantInfo(name, name.split("-")[0]) for name in accuracies}
    return correct, infos


@pytest.mark.parametrize("e3nn_accuracy", [0.6, 0.88])
def test_the_equivariant_gap_is_e3nn_against_the_best_unaugmented_baseline_paired(e3nn_accuracy):
    correct, infos = _study(e3nn_accuracy)
    fits = model_fits(rotation_tables(correct, infos, SETTINGS), infos, 13, "rotation")
    evidence = rotation_evidence(correct, infos, fits, SETTINGS)

    assert evidence.best_baseline == "dgcnn"  # the higher unrotated accuracy
    unrotated = {name: correct[name]["none"].mean() for name in correct}
    gap = evidence.equivariant_gap
    assert gap.value == pytest.approx(unrotated["e3nn"] - unrotated["dgcnn"])
    assert gap.lo < gap.value < gap.hi
    # The weakest case for the claim: the baseline with the smallest SO(3) drop, here DGCNN.
    drops = {name: correct[name]["none"].mean() - correct[name]["so3"].mean() for name in correct}
    assert evidence.effect.value == pytest.approx(drops["dgcnn"] - drops["e3nn"])

    verdict = v.claim_rotation(evidence)
    line = next(line for line in verdict.measured if line.startswith("unrotated accuracy, e3nn - dgcnn"))
    assert f"{100 * gap.value:+.1f} points" in line
    assert v.render_effect(verdict).startswith(f"{100 * evidence.effect.value:+.1f}")
