"""From per-sample measurements to estimates with intervals, and to the typed evidence the verdicts judge.

Every accuracy, and every difference a verdict uses, comes from `perception.evaluation.intervals`: a
hierarchical bootstrap that resamples training seeds, then test samples within each seed, with the same
indices for every model in a comparison (paired: all models were trained on the same seeds and tested on
the same samples and rotations). Rotation draws of one sample are averaged, never resampled: they are not
independent units.

Pure: arrays and settings in, plain dicts and `pipeline.verdicts` evidence out; no I/O.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from perception.evaluation.intervals import BootstrapSettings, Estimate, linear_effect
from pipeline.verdicts import (
    CostEvidence,
    ModelFit,
    ResolutionEvidence,
    RotationEvidence,
    SerialisationEvidence,
)

ROTATION_MODES = ("none", "z", "so3")


@dataclass(frozen=True)
class VariantInfo:
    """What the evaluation needs to know of a trained variant (from its checkpoints' flat config)."""

    name: str
    family: str
    augment: str = "none"  # point models: the rotation augmentation it trained with
    scan_order: str | None = None  # mamba_hybrid
    attn_layers: int | None = None  # mamba_hybrid


def per_sample(correct: np.ndarray) -> np.ndarray:
    """bool[S, N] or bool[S, N, D] -> float64[S, N]: each sample's accuracy over its rotation draws."""
    correct = np.asarray(correct, dtype=np.float64)
    return correct.mean(axis=-1) if correct.ndim == 3 else correct


def accuracy(correct: np.ndarray, settings: BootstrapSettings) -> Estimate:
    return linear_effect([per_sample(correct)], [1.0], settings)


def in_distribution_mode(augment: str) -> str:
    """The test rotation a point model's training matches: none for none, z for z, SO(3) for so3."""
    return {"none": "none", "z": "z", "so3": "so3"}[augment]


def rotation_tables(
    correct: dict[str, dict[str, np.ndarray]], infos: dict[str, VariantInfo], settings: BootstrapSettings
) -> dict[str, Any]:
    """variant -> {family, augment, accuracy: {mode: Estimate dict}, by_seed: {mode: [acc per seed]}}."""
    table = {}
    for variant, modes in correct.items():
        info = infos[variant]
        table[variant] = {
            "family": info.family,
            "augment": info.augment,
            "accuracy": {mode: accuracy(modes[mode], settings).as_dict() for mode in ROTATION_MODES},
            "by_seed": {
                mode: [round(float(x), 6) for x in per_sample(modes[mode]).mean(axis=1)]
                for mode in ROTATION_MODES
            },
        }
    return table


def angle_bins(
    correct: np.ndarray, angles: np.ndarray, settings: BootstrapSettings, width_deg: float = 15.0
) -> list[dict[str, Any]]:
    """Accuracy per rotation-angle bin with its interval: correct bool[S, N, D], angles float[N, D]."""
    flat_correct = correct.reshape(correct.shape[0], -1).astype(np.float64)  # [S, N*D]
    flat_angles = angles.reshape(-1)
    index = np.minimum((flat_angles // width_deg).astype(int), int(180 // width_deg) - 1)
    bins = []
    for i in range(int(180 // width_deg)):
        members = np.flatnonzero(index == i)
        row: dict[str, Any] = {
            "low_deg": i * width_deg,
            "high_deg": (i + 1) * width_deg,
            "count": len(members),
        }
        if len(members) >= 2:
            row.update(linear_effect([flat_correct[:, members]], [1.0], settings).as_dict())
        bins.append(row)
    return bins


def model_fits(
    table: dict[str, Any], infos: dict[str, VariantInfo], num_classes: int, key: str
) -> dict[str, ModelFit]:
    """variant -> ModelFit on its in-distribution test (`key`: "rotation" or "resolution" table kind)."""
    fits = {}
    for variant, row in table.items():
        if key == "rotation":
            estimate = row["accuracy"][in_distribution_mode(infos[variant].augment)]
        else:
            estimate = row["accuracy"][str(row["train_resolution"])]
        fits[variant] = ModelFit(variant, Estimate(**estimate), 1.0 / num_classes)
    return fits


def rotation_evidence(
    correct: dict[str, dict[str, np.ndarray]],
    infos: dict[str, VariantInfo],
    fits: dict[str, ModelFit],
    settings: BootstrapSettings,
) -> RotationEvidence:
    """Claim 4: every un-augmented model without 3D structure loses accuracy under SO(3); e3nn does not.

    Drops are none - so3 on the same clouds and seeds. The effect is the smallest baseline drop minus the
    equivariant model's drop, paired (the weakest case for the claim among the baselines)."""

    def drop(variant: str) -> Estimate:
        modes = correct[variant]
        return linear_effect([per_sample(modes["none"]), per_sample(modes["so3"])], [1.0, -1.0], settings)

    baselines = [v for v in correct if infos[v].family != "e3nn" and infos[v].augment == "none"]
    equivariant = [v for v in correct if infos[v].family == "e3nn"]
    baseline_drops = {v: drop(v) for v in baselines}
    equivariant_drops = {v: drop(v) for v in equivariant}
    effect, gap, best = None, None, ""
    if baselines and equivariant:
        weakest = min(baselines, key=lambda v: baseline_drops[v].value)
        e3nn = equivariant[0]
        arrays = [per_sample(correct[v][m]) for v in (weakest, e3nn) for m in ("none", "so3")]
        effect = linear_effect(arrays, [1.0, -1.0, -1.0, 1.0], settings)
        best = max(baselines, key=lambda v: per_sample(correct[v]["none"]).mean())
        gap = linear_effect(
            [per_sample(correct[e3nn]["none"]), per_sample(correct[best]["none"])], [1.0, -1.0], settings
        )
    used = tuple(fits[v] for v in [*baselines, *equivariant])
    return RotationEvidence(
        models=used,
        baseline_drops=baseline_drops,
        equivariant_drops=equivariant_drops,
        effect=effect,
        equivariant_gap=gap,
        best_baseline=best,
    )


def resolution_tables(
    correct: dict[str, dict[int, np.ndarray]],
    infos: dict[str, VariantInfo],
    train_resolution: int,
    patch_size: int,
    settings: BootstrapSettings,
) -> dict[str, Any]:
    table = {}
    for variant, by_res in correct.items():
        info = infos[variant]
        table[variant] = {
            "family": info.family,
            "scan_order": info.scan_order,
            "train_resolution": train_resolution,
            "tokens": {str(r): (r // patch_size) ** 2 for r in by_res},
            "accuracy": {str(r): accuracy(a, settings).as_dict() for r, a in by_res.items()},
            "by_seed": {str(r): [round(float(x), 6) for x in a.mean(axis=1)] for r, a in by_res.items()},
        }
    return table


def _drop_arrays(correct: dict[int, np.ndarray], train_res: int, largest: int) -> list[np.ndarray]:
    return [per_sample(correct[train_res]), per_sample(correct[largest])]


def resolution_evidence(
    correct: dict[str, dict[int, np.ndarray]],
    infos: dict[str, VariantInfo],
    fits: dict[str, ModelFit],
    train_resolution: int,
    settings: BootstrapSettings,
) -> ResolutionEvidence | None:
    """Claim 2 (interim design): ViT's accuracy drop from the training to the largest test resolution,
    minus the mean drop of the Mamba variants (no position embedding), paired over seeds and samples."""
    vit = [v for v in correct if infos[v].family == "vit"]
    mamba = [v for v in correct if infos[v].family == "mamba_hybrid"]
    if not vit or not mamba:
        return None
    largest = max(correct[vit[0]])
    if largest == train_resolution:
        return None
    arrays = _drop_arrays(correct[vit[0]], train_resolution, largest)
    weights = [1.0, -1.0]
    for v in mamba:
        arrays += _drop_arrays(correct[v], train_resolution, largest)
        weights += [-1.0 / len(mamba), 1.0 / len(mamba)]
    effect = linear_effect(arrays, weights, settings)
    return ResolutionEvidence(
        models=tuple(fits[v] for v in [vit[0], *mamba]),
        effect=effect,
        train_resolution=train_resolution,
        largest_resolution=largest,
    )


def serialisation_evidence(
    correct: dict[str, dict[int, np.ndarray]],
    infos: dict[str, VariantInfo],
    fits: dict[str, ModelFit],
    train_resolution: int,
    locality: dict[str, float],
    settings: BootstrapSettings,
) -> SerialisationEvidence | None:
    """Claim 1 (interim design): the best non-row-major scan order's accuracy minus row-major's, paired.

    Which order is "best" is chosen on the point estimate; the interval is that of the chosen pair."""
    orders: dict[str, str] = {}
    for v in correct:
        if infos[v].family == "mamba_hybrid" and infos[v].scan_order:
            orders.setdefault(infos[v].scan_order, v)
    if "rowmajor" not in orders or len(orders) < 2:
        return None
    at_train = {o: per_sample(correct[v][train_resolution]) for o, v in orders.items()}
    others = [o for o in orders if o != "rowmajor"]
    best = max(others, key=lambda o: at_train[o].mean())
    effect = linear_effect([at_train[best], at_train["rowmajor"]], [1.0, -1.0], settings)
    return SerialisationEvidence(
        models=tuple(fits[v] for v in orders.values()), effect=effect, best_order=best, locality=locality
    )


def cost_evidence(cost: dict[str, Any]) -> CostEvidence:
    """Claim 3 from the measured cost sweep (`perception.evaluation.cost.CostStudy.as_dict()`): latency
    exponents over the upper sweep with bootstrap intervals over timing repeats, their ViT - Mamba gap, the
    peak-memory exponents of fused and explicit attention and of Mamba (context), and the crossover."""

    def estimate(d: dict[str, Any] | None) -> Estimate | None:
        return None if d is None else Estimate(float(d["value"]), float(d["lo"]), float(d["hi"]))

    fits = cost["fits"]
    memory = {
        name: estimate(fits[name]["memory"]) for name in ("vit", "vit_explicit", "mamba") if name in fits
    }
    return CostEvidence(
        latency_exponent_gap=estimate(cost.get("latency_gap")),
        vit_latency_exponent=estimate(fits.get("vit", {}).get("latency")),
        mamba_latency_exponent=estimate(fits.get("mamba", {}).get("latency")),
        memory_exponents=memory,
        crossover_tokens=cost.get("crossover_tokens"),
    )


# ------------------------------------------------------------------------------------ to and from JSON

EVIDENCE_TYPES = {
    "serialisation": SerialisationEvidence,
    "position_embedding": ResolutionEvidence,
    "cost": CostEvidence,
    "rotation": RotationEvidence,
}


def evidence_dict(evidence: Any) -> dict[str, Any]:
    """A claim's evidence as plain JSON (estimates as {value, lo, hi})."""
    return dataclasses.asdict(evidence)


def fit_dict(fit: ModelFit) -> dict[str, Any]:
    floor = fit.chance + 0.5 * (1 - fit.chance)
    return {**dataclasses.asdict(fit), "floor": floor}


def _estimate(d: dict[str, float] | None) -> Estimate | None:
    return None if d is None else Estimate(float(d["value"]), float(d["lo"]), float(d["hi"]))


def _fit(d: dict[str, Any]) -> ModelFit:
    return ModelFit(d["name"], _estimate(d["accuracy"]), float(d["chance"]))


def load_evidence(name: str, d: dict[str, Any]) -> Any:
    """The typed evidence of one claim from `results.json` (`evidence.<name>`)."""
    cls = EVIDENCE_TYPES[name]
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        value = d[field.name]
        if field.name == "models":
            value = tuple(_fit(m) for m in value)
        elif isinstance(value, dict) and set(value) == {"value", "lo", "hi"}:
            value = _estimate(value)
        elif (
            isinstance(value, dict)
            and value
            and all(isinstance(v, dict) and set(v) == {"value", "lo", "hi"} for v in value.values())
        ):
            value = {k: _estimate(v) for k, v in value.items()}
        kwargs[field.name] = value
    return cls(**kwargs)
