"""pipeline.evaluation.evidence: per-sample correctness arrays in, the estimates a verdict judges (synthetic
data)."""

from __future__ import annotations

import numpy as np
import pytest

from perception.evaluation.intervals import BootstrapSettings
from pipeline.evaluation import verdicts as v
from pipeline.evaluation.evidence import (
    VariantInfo,
    canvas_set_names,
    canvas_tables,
    model_fits,
    proximity_table,
    resolution_evidence,
    rotation_evidence,
    rotation_tables,
    serialisation_evidence,
)

SETTINGS = BootstrapSettings(resamples=400, seed=0)
SEEDS, CLOUDS, DRAWS = 3, 200, 2


def _correct(accuracy: float, seed: int) -> np.ndarray:
    """bool[S, N, D]: each (seed, cloud, draw) right with probability `accuracy`."""
    return np.random.default_rng(seed).random((SEEDS, CLOUDS, DRAWS)) < accuracy


def _study(e3nn_accuracy: float, augmented: bool = False) -> tuple[dict, dict]:
    """Two un-augmented baselines that fail under SO(3) and an e3nn model that does not; with `augmented`,
    two baselines trained with SO(3) augmentation besides, each about as good under SO(3) as unrotated."""
    accuracies = {  # variant -> (none, z, so3)
        "pointnet-none": (0.85, 0.6, 0.2),
        "dgcnn": (0.9, 0.7, 0.3),
        "e3nn": (e3nn_accuracy, e3nn_accuracy, e3nn_accuracy),
    }
    if augmented:
        accuracies |= {"pointnet-so3": (0.65, 0.64, 0.63), "dgcnn-so3": (0.83, 0.82, 0.82)}
    correct = {
        name: {
            mode: _correct(a, 10 * i + j)
            for j, (mode, a) in enumerate(zip(("none", "z", "so3"), acc, strict=True))
        }
        for i, (name, acc) in enumerate(accuracies.items())
    }
    infos = {
        name: VariantInfo(name, name.split("-")[0], "so3" if name.endswith("-so3") else "none")
        for name in accuracies
    }
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
    assert evidence.augmented_gap is None  # no baseline trained with SO(3) augmentation: no line
    assert not any(line.startswith("under SO(3)") for line in verdict.measured)


@pytest.mark.parametrize("e3nn_accuracy", [0.6, 0.88])
def test_the_augmented_gap_is_e3nn_against_the_best_so3_augmented_baseline_under_so3(e3nn_accuracy):
    correct, infos = _study(e3nn_accuracy, augmented=True)
    fits = model_fits(rotation_tables(correct, infos, SETTINGS), infos, 13, "rotation")
    evidence = rotation_evidence(correct, infos, fits, SETTINGS)

    assert evidence.best_augmented == "dgcnn-so3"  # the higher accuracy under SO(3)
    assert evidence.best_baseline == "dgcnn"  # the augmented ones are not un-augmented baselines
    under_so3 = {name: correct[name]["so3"].mean() for name in correct}
    gap = evidence.augmented_gap
    assert gap.value == pytest.approx(under_so3["e3nn"] - under_so3["dgcnn-so3"])
    assert gap.lo < gap.value < gap.hi
    assert (gap.value > 0) == (e3nn_accuracy > 0.82)
    line = next(line for line in v.claim_rotation(evidence).measured if line.startswith("under SO(3)"))
    assert line.startswith("under SO(3), e3nn - dgcnn-so3 (the best baseline trained with SO(3) augmentation")
    assert f"{100 * gap.value:+.1f} points" in line


# ------------------------------------------------------------------------------ claims 1 and 2

IMAGES = 300


def _images(accuracy: float, seed: int) -> np.ndarray:
    """bool[S, N]: each (seed, test image) right with probability `accuracy`."""
    return np.random.default_rng(seed).random((SEEDS, IMAGES)) < accuracy


@pytest.mark.parametrize("rowmajor, random, outcome", [(0.7, 0.5, v.HOLDS), (0.95, 0.95, v.DOES_NOT_HOLD)])
def test_serialisation_evidence_picks_the_best_locality_preserving_order_and_the_rule_can_go_either_way(
    rowmajor, random, outcome
):
    accuracies = {"rowmajor": rowmajor, "snake": 0.95, "hilbert": 0.95, "cross": 0.96, "random": random}
    # One shared draw: orders of equal accuracy are then equally right on every image (a null effect).
    draw = np.random.default_rng(0).random((SEEDS, IMAGES))
    correct = {f"m-{o}": {"in": draw < a} for o, a in accuracies.items()}
    correct["vit"] = {"in": _images(0.5, 9)}
    infos = {f"m-{o}": VariantInfo(f"m-{o}", "mamba_hybrid", scan_order=o) for o in accuracies}
    infos["vit"] = VariantInfo("vit", "vit", pos_embed="learned")
    fits = model_fits(proximity_table(correct, infos, SETTINGS), infos, 2, "proximity")
    evidence = serialisation_evidence(correct, infos, fits, {o: 0.5 for o in accuracies}, SETTINGS)

    assert evidence.best_order == "cross" and evidence.reference == "vit"
    assert set(evidence.effects) == {"rowmajor", "snake", "hilbert", "random"}
    for order, effect in evidence.effects.items():
        expected = correct["m-cross"]["in"].mean() - correct[f"m-{order}"]["in"].mean()
        assert effect.value == pytest.approx(expected)
    assert v.claim_serialisation(evidence).verdict == outcome


def _canvas_study(unhelped_b: float) -> tuple[dict, dict]:
    """Accuracy per test set: `in` 0.8 for all; (b) as given for the unhelped table, 0.7 for the others."""
    sets = canvas_set_names((64,))
    accuracies = {
        "vit-learned_fixed": {
            "fov_64": 0.4,
            "centre_64": unhelped_b,
            "corner_64": unhelped_b,
            "scaled_64": 0.5,
        },
        "vit-learned": {"fov_64": 0.6, "centre_64": 0.3, "corner_64": 0.3, "scaled_64": 0.5},
        "vit-rope": {"fov_64": 0.5, "centre_64": 0.7, "corner_64": 0.7, "scaled_64": 0.5},
        "mamba": {"fov_64": 0.5, "centre_64": 0.75, "corner_64": 0.75, "scaled_64": 0.5},
    }
    draw = np.random.default_rng(1).random((SEEDS, IMAGES))
    correct = {
        name: {s: draw < (0.8 if s == "in" else acc[s]) for s in sets} for name, acc in accuracies.items()
    }
    infos = {
        "vit-learned_fixed": VariantInfo("vit-learned_fixed", "vit", pos_embed="learned_fixed"),
        "vit-learned": VariantInfo("vit-learned", "vit", pos_embed="learned"),
        "vit-rope": VariantInfo("vit-rope", "vit", pos_embed="rope"),
        "mamba": VariantInfo("mamba", "mamba_hybrid", scan_order="rowmajor", attn_layers=0),
    }
    return correct, infos


@pytest.mark.parametrize("unhelped_b, outcome", [(0.4, v.HOLDS), (0.7, v.DOES_NOT_HOLD)])
def test_resolution_evidence_compares_the_unhelped_table_with_the_structural_variant_that_drops_most(
    unhelped_b, outcome
):
    correct, infos = _canvas_study(unhelped_b)
    table = canvas_tables(correct, infos, (64,), 32, 4, SETTINGS)
    fits = model_fits(table, infos, 13, "resolution")
    evidence = resolution_evidence(correct, infos, fits, (64,), 32, SETTINGS)

    assert evidence.unhelped == "vit-learned_fixed" and evidence.resampled == "vit-learned"
    assert evidence.weakest_structural == "vit-rope"  # drops 10 points on (b); Mamba 5
    drop = {n: correct[n]["in"].mean() - (correct[n]["centre_64"].mean() + correct[n]["corner_64"].mean()) / 2
            for n in correct}  # fmt: skip
    assert evidence.effect.value == pytest.approx(drop["vit-learned_fixed"] - drop["vit-rope"])
    assert evidence.resampled_effect.value == pytest.approx(drop["vit-learned"] - drop["vit-rope"])
    assert [f.name for f in evidence.models] == ["vit-learned_fixed", "vit-rope", "mamba"]  # not resampled
    assert v.claim_position_embedding(evidence).verdict == outcome


def test_the_decomposition_is_the_arithmetic_of_the_test_sets():
    correct, infos = _canvas_study(0.4)
    parts = canvas_tables(correct, infos, (64,), 32, 4, SETTINGS)["vit-learned_fixed"]["drops"]["64"]
    acc = {s: correct["vit-learned_fixed"][s].mean() for s in correct["vit-learned_fixed"]}
    a, c = acc["in"] - acc["fov_64"], acc["in"] - acc["scaled_64"]
    b = acc["in"] - (acc["centre_64"] + acc["corner_64"]) / 2
    assert parts["a"]["value"] == pytest.approx(a) and parts["c"]["value"] == pytest.approx(c)
    assert parts["b"]["value"] == pytest.approx(b)
    assert parts["b_plus_c"]["value"] == pytest.approx(b + c)
    assert parts["a_minus_b_c"]["value"] == pytest.approx(a - b - c)
    assert parts["a_minus_b_c"]["lo"] <= parts["a_minus_b_c"]["value"] <= parts["a_minus_b_c"]["hi"]


def test_the_unhelped_reading_is_the_same_checkpoint_with_the_table_at_its_own_positions():
    import dataclasses

    import torch

    from perception.models import build
    from perception.models.checkpoint import ModelCheckpoint, model_config
    from pipeline.evaluation.measurements import Checkpoint, with_unhelped_tables

    torch.manual_seed(0)
    model = build("vit", "tiny", num_classes=3, in_channels=4, patch_size=4, image_size=16)
    state = model.state_dict()
    training = {"variant": "vit-learned", "seed": 0, "dataset": "images"}
    saved = ModelCheckpoint("vit", model_config(model), state, training)
    checkpoints = {"vit-learned": {0: Checkpoint("vit-learned", 0, saved, model.eval())}}
    out = with_unhelped_tables(checkpoints)
    assert set(out) == {"vit-learned", "vit-learned_fixed"}
    fixed = out["vit-learned_fixed"][0]
    assert fixed.config["pos_embed"] == "learned_fixed" and fixed.training["read_from"] == "vit-learned"
    assert fixed.training["variant"] == "vit-learned_fixed" and fixed.saved.state_dict is state
    small, large = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(fixed.model(small), model(small))  # the training grid: one and the same model
        assert not torch.allclose(fixed.model(large), model(large))  # a larger grid: resampled or not
        reference = build("vit", "tiny", num_classes=3, in_channels=4, patch_size=4, image_size=16,
                          pos_embed="learned_fixed")  # fmt: skip
        reference.load_state_dict(state)
        assert torch.equal(fixed.model.eval()(large), reference.eval()(large))
    # the proximity task's ViT (claim 1's reference) is not read a second way: it is tested on one grid
    proximity = dataclasses.replace(saved, training={**training, "dataset": "proximity"})
    reference_only = {"proximity_vit": {0: Checkpoint("proximity_vit", 0, proximity, model)}}
    assert set(with_unhelped_tables(reference_only)) == {"proximity_vit"}
    # a variant trained as learned_fixed itself is kept, not overwritten
    own = dataclasses.replace(saved, config={**saved.config, "pos_embed": "learned_fixed"})
    trained = {0: Checkpoint("vit-learned_fixed", 0, own, model)}
    assert with_unhelped_tables({**checkpoints, "vit-learned_fixed": trained})["vit-learned_fixed"] is trained
