"""Every verdict rule through every outcome: holds, does not hold, inconclusive by interval, and
inconclusive by the adequacy gate; `judge` at its boundaries; the module stays pure."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from perception.evaluation.intervals import Estimate
from pipeline.evaluation import verdicts as v
from pipeline.evaluation.verdicts import (
    DOES_NOT_HOLD,
    HOLDS,
    INCONCLUSIVE,
    CostEvidence,
    ModelFit,
    ResolutionEvidence,
    RotationEvidence,
    SerialisationEvidence,
)

CHANCE = 0.1  # ten classes: floor 55%


def est(value: float, lo: float, hi: float) -> Estimate:
    return Estimate(value, lo, hi)


def fit(name: str, accuracy: float = 0.8) -> ModelFit:
    return ModelFit(name, est(accuracy, accuracy - 0.02, accuracy + 0.02), CHANCE)


# Effects in fraction units (the rules judge them in points) for the three interval outcomes.
POSITIVE = est(0.08, 0.06, 0.10)  # +8 [6, 10] points
NULL = est(0.0, -0.01, 0.015)  # within +/-2 points
WIDE = est(0.04, -0.01, 0.09)  # straddles both


# --------------------------------------------------------------------------------------- claim 1


def serialisation(
    rowmajor: Estimate, random: Estimate | None = None, best_accuracy: float = 0.95, others: Estimate = NULL
) -> SerialisationEvidence:
    """The best order (cross) against row-major, the random permutation (as `rowmajor` unless given), and
    the other locality-preserving orders (`others`). Row-major and random are far below the floor: they are
    not gated."""
    orders = ("rowmajor", "snake", "hilbert", "cross", "random")
    accuracy = {"rowmajor": 0.7, "snake": 0.9, "hilbert": 0.9, "cross": best_accuracy, "random": 0.5}
    models = tuple(ModelFit(f"m-{o}", est(a, a - 0.02, a + 0.02), 0.5) for o, a in accuracy.items())
    effects = {"rowmajor": rowmajor, "snake": others, "hilbert": others, "random": random or rowmajor}
    return SerialisationEvidence(
        models=models,
        best_order="cross",
        effects=effects,
        accuracies={o: est(a, a - 0.02, a + 0.02) for o, a in accuracy.items()},
        locality={o: 0.5 for o in orders},
        reference="vit",
        reference_accuracy=est(0.5, 0.48, 0.52),
    )


@pytest.mark.parametrize(
    "rowmajor, random, others, outcome",
    [
        (POSITIVE, POSITIVE, NULL, HOLDS),
        (NULL, NULL, NULL, DOES_NOT_HOLD),  # every order within the margin of the best
        (WIDE, WIDE, NULL, INCONCLUSIVE),
        (POSITIVE, WIDE, NULL, INCONCLUSIVE),  # random not shown below the best: no verdict
        (WIDE, POSITIVE, NULL, INCONCLUSIVE),  # nor row-major
        (NULL, NULL, POSITIVE, INCONCLUSIVE),  # controls level with the best, yet another order is not
    ],
)
def test_serialisation_outcomes_by_interval(rowmajor, random, others, outcome):
    verdict = v.claim_serialisation(serialisation(rowmajor, random, others=others))
    assert verdict.verdict == outcome
    assert verdict.claim == 1 and verdict.excluded == ()
    assert verdict.models_used == ("m-cross",)  # only the best scan is gated
    assert verdict.effect == rowmajor.scaled(100)  # judged in points
    assert "+5 points" in verdict.rule and "+/-2 points" in verdict.rule and "85%" in verdict.rule
    assert "cross" in verdict.effect_name
    assert any("never decides" in line for line in verdict.measured)  # locality is context
    assert any("attention reference" in line and "50.0%" in line for line in verdict.measured)


def test_serialisation_is_inconclusive_when_the_best_scan_did_not_learn_the_task():
    verdict = v.claim_serialisation(serialisation(POSITIVE, best_accuracy=0.84))
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.excluded == ("m-cross (84.0% < floor 85.0%)",)
    assert "m-cross" in verdict.would_change and "85.0%" in verdict.would_change


def test_serialisation_needs_both_controls():
    evidence = serialisation(POSITIVE)
    without_random = SerialisationEvidence(
        evidence.models, "cross", {k: e for k, e in evidence.effects.items() if k != "random"}
    )
    verdict = v.claim_serialisation(without_random)
    assert verdict.verdict == INCONCLUSIVE and "random" in verdict.would_change


@pytest.mark.parametrize("effect", [POSITIVE, NULL, WIDE])
def test_locality_never_decides(effect):
    base = serialisation(effect)
    for locality in ({}, {"rowmajor": 0.0, "cross": 1.0}, {"rowmajor": 1.0, "cross": 0.0}):
        evidence = SerialisationEvidence(base.models, "cross", base.effects, base.accuracies, locality)
        assert v.claim_serialisation(evidence).verdict == v.claim_serialisation(base).verdict


# --------------------------------------------------------------------------------------- claim 2


def resolution(effect: Estimate, unhelped_accuracy: float = 0.8) -> ResolutionEvidence:
    models = (fit("vit-learned_fixed", unhelped_accuracy), fit("vit-rope"), fit("mamba"))
    return ResolutionEvidence(
        models=models,
        effect=effect,
        unhelped="vit-learned_fixed",
        weakest_structural="vit-rope",
        train_canvas=32,
        canvas=64,
        drops={"vit-learned_fixed": est(0.2, 0.15, 0.25), "vit-rope": est(0.08, 0.05, 0.11)},
        resampled="vit-learned",
        resampled_effect=est(0.03, 0.0, 0.06),
    )


@pytest.mark.parametrize(
    "effect, outcome",
    [
        (est(0.12, 0.07, 0.17), HOLDS),
        (NULL, DOES_NOT_HOLD),
        (est(0.06, 0.03, 0.09), INCONCLUSIVE),  # above 2 points but not wholly above 5
    ],
)
def test_position_embedding_outcomes_by_interval(effect, outcome):
    verdict = v.claim_position_embedding(resolution(effect))
    assert verdict.verdict == outcome and verdict.excluded == ()
    assert (verdict.threshold, verdict.margin) == (v.POSITION_THRESHOLD, v.POSITION_MARGIN)
    assert "vit-learned_fixed - vit-rope" in verdict.effect_name
    assert "32 px -> 64 px" in verdict.rule
    # the usual fix is reported, never decides
    assert any("vit-learned" in line and "never decides" in line for line in verdict.measured)


def test_a_reversed_effect_is_inconclusive_and_says_so():
    verdict = v.claim_position_embedding(resolution(est(-0.41, -0.58, -0.24)))
    assert verdict.verdict == INCONCLUSIVE  # "does not hold" is reserved for no effect (SPEC)
    assert "runs against the claim" in verdict.would_change and "-2.0 points" in verdict.would_change
    assert "runs against" not in v.claim_position_embedding(resolution(WIDE)).would_change


def test_the_resampled_table_never_decides():
    base = resolution(est(0.12, 0.07, 0.17))
    for resampled in (est(0.5, 0.4, 0.6), est(-0.5, -0.6, -0.4)):
        evidence = ResolutionEvidence(**{**base.__dict__, "resampled_effect": resampled})
        assert v.claim_position_embedding(evidence).verdict == HOLDS


def test_position_embedding_is_inconclusive_when_the_unhelped_vit_is_undertrained():
    verdict = v.claim_position_embedding(resolution(est(0.12, 0.07, 0.17), unhelped_accuracy=0.3))
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.excluded == ("vit-learned_fixed (30.0% < floor 55.0%)",)


# --------------------------------------------------------------------------------------- claim 3

LINEAR = est(1.0, 0.95, 1.1)
MEMORY = {
    "vit_fused": est(1.05, 1.0, 1.1),
    "vit_explicit": est(1.8, 1.7, 1.9),
    "mamba": est(1.15, 1.1, 1.25),
}


def cost(
    gap: Estimate,
    mamba: Estimate = LINEAR,
    crossover: int | None = 1024,
    others_cpu: float | None = 0.02,
    gpu_other_processes: int | None = None,
) -> CostEvidence:
    vit = est(mamba.value + gap.value, mamba.lo + gap.lo, mamba.hi + gap.hi)
    return CostEvidence(
        latency_exponent_gap=gap,
        vit_latency_exponent=vit,
        mamba_latency_exponent=mamba,
        memory_exponents=MEMORY,
        crossover_tokens=crossover,
        others_cpu=others_cpu,
        busiest_row="mamba at 4096 tokens",
        gpu_other_processes=gpu_other_processes,
    )


@pytest.mark.parametrize(
    "gap, mamba, outcome",
    [
        (est(0.6, 0.45, 0.75), LINEAR, HOLDS),
        (est(0.6, 0.45, 0.75), est(1.3, 1.2, 1.4), INCONCLUSIVE),  # Mamba not shown linear
        (est(0.0, -0.05, 0.08), LINEAR, DOES_NOT_HOLD),
        (est(0.2, 0.05, 0.35), LINEAR, INCONCLUSIVE),
    ],
)
def test_cost_outcomes(gap, mamba, outcome):
    verdict = v.claim_cost(cost(gap, mamba))
    assert verdict.verdict == outcome
    assert verdict.effect == gap  # exponent units, not scaled
    assert verdict.models_used == () and verdict.excluded == ()  # no trained models: no gate
    assert verdict.unit == ""


def test_cost_names_the_mamba_exponent_when_it_blocks_holding():
    verdict = v.claim_cost(cost(est(0.6, 0.45, 0.75), est(1.3, 1.2, 1.4)))
    assert "below 1.3" in verdict.would_change and "now 1.40" in verdict.would_change


def test_cost_context_says_which_memory_path_grows_superlinearly():
    lines = v.claim_cost(cost(est(0.6, 0.45, 0.75), crossover=None)).measured
    explicit = next(line for line in lines if "vit_explicit" in line)
    fused = next(line for line in lines if "vit_fused" in line)
    mamba = next(line for line in lines if "memory exponent, mamba" in line)
    assert "superlinearly" in explicit and "about linear" in fused and "neither clearly" in mamba
    assert any("crossover: none" in line for line in lines)


BUSY_CASES = [
    (est(0.6, 0.45, 0.75), LINEAR),  # would hold
    (est(0.0, -0.05, 0.08), LINEAR),  # would not hold
    (est(-0.27, -0.38, -0.02), LINEAR),  # a reversed effect, as a busy laptop once gave
    (est(0.2, 0.05, 0.35), LINEAR),  # inconclusive anyway
]


@pytest.mark.parametrize("gap, mamba", BUSY_CASES)
def test_a_busy_machine_makes_every_cost_verdict_inconclusive_and_says_why(gap, mamba):
    verdict = v.claim_cost(cost(gap, mamba, others_cpu=0.63))
    assert verdict.verdict == INCONCLUSIVE
    (reason,) = verdict.excluded
    assert "the machine was busy during timing" in reason and "63%" in reason and "mamba at 4096" in reason
    assert "quiet machine" in verdict.would_change
    assert verdict.effect == gap  # still reported, deciding nothing
    assert any("contention" in line and "63.0%" in line for line in verdict.measured)


@pytest.mark.parametrize("gap, mamba", BUSY_CASES)
def test_another_process_on_the_gpu_makes_the_cost_verdict_inconclusive(gap, mamba):
    verdict = v.claim_cost(cost(gap, mamba, gpu_other_processes=2))
    assert verdict.verdict == INCONCLUSIVE and "2 other process(es) were on the GPU" in verdict.excluded[0]


@pytest.mark.parametrize(
    "others, gpu, busy",
    [(0.02, None, False), (0.2, 0, False), (0.21, None, True), (None, None, False), (0.0, 1, True)],
)
def test_the_busy_gate_at_its_threshold(others, gpu, busy):
    evidence = cost(est(0.6, 0.45, 0.75), others_cpu=others, gpu_other_processes=gpu)
    assert (v.busy(evidence) is not None) == busy
    assert v.claim_cost(evidence).verdict == (INCONCLUSIVE if busy else HOLDS)


def test_cost_without_a_gap_is_inconclusive():
    verdict = v.claim_cost(CostEvidence(None, None, None))
    assert verdict.verdict == INCONCLUSIVE and v.render_effect(verdict) == "not measured"


# --------------------------------------------------------------------------------------- claim 4

E3NN_FLAT = est(0.005, -0.01, 0.02)  # within +/-3 points
E3NN_DROPPING = est(0.02, -0.01, 0.05)  # reaches +5 points


def rotation(
    effect: Estimate | None, e3nn_drop: Estimate = E3NN_FLAT, e3nn_accuracy: float = 0.8
) -> RotationEvidence:
    return RotationEvidence(
        models=(fit("pointnet-none"), fit("dgcnn"), fit("e3nn", e3nn_accuracy), fit("pointnet-so3", 0.2)),
        baseline_drops={"pointnet-none": est(0.4, 0.35, 0.45), "dgcnn": est(0.3, 0.25, 0.35)},
        equivariant_drops={"e3nn": e3nn_drop},
        effect=effect,
    )


@pytest.mark.parametrize(
    "effect, e3nn_drop, outcome",
    [
        (est(0.3, 0.25, 0.35), E3NN_FLAT, HOLDS),
        (est(0.3, 0.25, 0.35), E3NN_DROPPING, INCONCLUSIVE),  # e3nn itself not shown invariant
        (est(0.0, -0.02, 0.02), E3NN_FLAT, DOES_NOT_HOLD),
        (est(0.08, 0.02, 0.15), E3NN_FLAT, INCONCLUSIVE),
        (None, E3NN_FLAT, INCONCLUSIVE),
    ],
)
def test_rotation_outcomes(effect, e3nn_drop, outcome):
    verdict = v.claim_rotation(rotation(effect, e3nn_drop))
    assert verdict.verdict == outcome
    # The augmented baseline is context: below the floor, yet neither gated nor used.
    assert verdict.excluded == ()
    assert verdict.models_used == ("pointnet-none", "dgcnn", "e3nn")
    assert any("pointnet-so3" in line and "not gated" in line for line in verdict.measured)
    assert "dgcnn" in verdict.effect_name  # the smallest baseline drop


def test_rotation_is_inconclusive_when_e3nn_is_undertrained():
    verdict = v.claim_rotation(rotation(est(0.3, 0.25, 0.35), e3nn_accuracy=0.5))
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.excluded == ("e3nn (50.0% < floor 55.0%)",)
    assert "e3nn" in verdict.would_change


def test_rotation_gates_a_needed_model_the_evaluation_lacks():
    evidence = rotation(est(0.3, 0.25, 0.35))
    evidence = RotationEvidence(
        evidence.models[:2], evidence.baseline_drops, evidence.equivariant_drops, evidence.effect
    )
    verdict = v.claim_rotation(evidence)
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.excluded == ("e3nn (no in-distribution accuracy measured)",)


# --------------------------------------------------------------------------------------- shared parts


@pytest.mark.parametrize(
    "effect, outcome",
    [
        (est(3.0, 2.0, 4.0), INCONCLUSIVE),  # lo == threshold is not beyond it
        (est(3.0, 2.0001, 4.0), HOLDS),
        (est(0.0, -1.0, 1.0), DOES_NOT_HOLD),  # exactly the margin is within it
        (est(0.0, -1.0, 1.0001), INCONCLUSIVE),
        (est(0.0, -1.0001, 1.0), INCONCLUSIVE),
        (est(-5.0, -6.0, -4.0), INCONCLUSIVE),  # an effect against the claim is not "no effect"
        (est(math.nan, math.nan, math.nan), INCONCLUSIVE),
    ],
)
def test_judge_boundaries(effect, outcome):
    assert v.judge(effect, threshold=2.0, margin=1.0) == outcome


def test_judge_rejects_a_margin_beyond_the_threshold():
    with pytest.raises(ValueError, match="margin"):
        v.judge(est(0, 0, 0), threshold=1.0, margin=2.0)


def test_combine_needs_every_effect():
    assert v.combine([HOLDS, HOLDS]) == HOLDS
    assert v.combine([HOLDS, INCONCLUSIVE]) == INCONCLUSIVE
    assert v.combine([HOLDS, DOES_NOT_HOLD]) == DOES_NOT_HOLD
    assert v.combine([]) == INCONCLUSIVE


def test_gate_floor_is_halfway_from_chance_and_inclusive():
    model = ModelFit("m", est(0.75, 0.7, 0.8), chance=0.5)
    assert model.floor == 0.75
    assert v.gate([model]) == (["m"], [])
    below = ModelFit("m", est(0.7499, 0.7, 0.8), chance=0.5)
    assert v.gate([below]) == ([], ["m (75.0% < floor 75.0%)"])
    # judged on the point estimate: an interval reaching below the floor does not exclude
    assert v.gate([ModelFit("m", est(0.8, 0.5, 0.9), chance=0.5)]) == (["m"], [])


def test_as_dict_holds_the_report_keys_and_is_json():
    verdict = v.claim_serialisation(serialisation(POSITIVE))
    d = verdict.as_dict()
    assert {
        "verdict",
        "rule",
        "effect",
        "interval",
        "threshold",
        "margin",
        "models_used",
        "excluded",
        "would_change",
        "effect_name",
        "claim",
        "title",
    } <= set(d)
    assert d["effect"] == pytest.approx(8.0) and d["interval"] == pytest.approx([6.0, 10.0])
    assert d["models_used"] == ["m-cross"]
    json.dumps(d)


def test_render_effect():
    verdict = v.claim_serialisation(serialisation(est(0.073, 0.041, 0.102)))
    assert v.render_effect(verdict) == "+7.3 points [4.1, 10.2]"
    assert v.render_effect(v.claim_cost(cost(est(0.45, 0.31, 0.6)))) == "+0.45 [0.31, 0.60]"


def test_no_evidence_is_inconclusive_with_the_claims_threshold():
    verdict = v.no_evidence(2, v.TITLES[2], "no ViT was trained")
    assert verdict.verdict == INCONCLUSIVE and "no ViT was trained" in verdict.rule
    assert (verdict.threshold, verdict.margin) == (v.POSITION_THRESHOLD, v.POSITION_MARGIN)
    json.dumps(verdict.as_dict())


@pytest.mark.parametrize("outcome_case", ["holds", "does not hold", "inconclusive"])
def test_would_change_quotes_the_numbers(outcome_case):
    effect = {"holds": POSITIVE, "does not hold": NULL, "inconclusive": WIDE}[outcome_case]
    verdict = v.claim_serialisation(serialisation(effect))
    assert verdict.verdict == outcome_case
    assert "+5.0 points" in verdict.would_change  # the threshold
    assert (
        f"{100 * effect.lo:+.1f}" in verdict.would_change or f"{100 * effect.lo:.1f}" in verdict.would_change
    )


def test_the_rules_are_pure():
    source = Path(v.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    allowed = {
        "__future__",
        "math",
        "collections.abc",
        "dataclasses",
        "typing",
        "perception.evaluation.intervals",
    }
    assert imported <= allowed
    probe = (
        "import sys, pipeline.evaluation.verdicts; "
        "print(sorted(m for m in ('torch', 'mlflow', 'ray', 'dvc') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(v.__file__).parents[1],
    ).stdout.strip()
    assert loaded == "[]"
