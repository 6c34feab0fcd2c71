"""From per-sample measurements to estimates with intervals, and to the typed evidence the verdicts judge.

Every accuracy, and every difference a verdict uses, comes from `perception.evaluation.intervals`: a
hierarchical bootstrap that resamples training seeds, then test samples within each seed, with the same
indices for every model in a comparison (paired: all models were trained on the same seeds and tested on
the same samples and rotations). Rotation draws of one sample are averaged, never resampled: they are not
independent units.

Pure: arrays and settings in, plain dicts and `pipeline.evaluation.verdicts` evidence out (which
`pipeline.evaluation.results` validates into the typed results); no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from perception.evaluation.intervals import BootstrapSettings, Estimate, linear_effect
from perception.ops.serialization import SCAN_ORDERS, locality_stats, scan_directions
from perception.rotations import MODES as ROTATION_MODES
from pipeline.evaluation import metric_names
from pipeline.evaluation.verdicts import (
    LOCALITY_PRESERVING,
    CostEvidence,
    ModelFit,
    ResolutionEvidence,
    RotationEvidence,
    SerialisationEvidence,
)

if TYPE_CHECKING:  # the trained models: a type only (measurements loads every model family)
    from pipeline.evaluation.measurements import Checkpoint


@dataclass(frozen=True)
class VariantInfo:
    """What the evaluation needs to know of a trained variant (from its checkpoints' config and training)."""

    name: str
    family: str
    augment: str = "none"  # point models: the rotation augmentation it trained with
    scan_order: str | None = None  # mamba_hybrid
    attn_layers: int | None = None  # mamba_hybrid
    pos_embed: str | None = None  # vit
    dataset: str = "images"  # "points", "images" (the shape renders) or "proximity"

    @property
    def encoding(self) -> str:
        """Claim 2's role of a shape-image variant: "unhelped" (ViT's learned table at its own positions),
        "resampled" (the table bicubic-resampled), or "structural" (sin-cos, RoPE, none, the Mamba models)."""
        if self.family == "vit":
            return {"learned_fixed": "unhelped", "learned": "resampled"}.get(
                self.pos_embed or "", "structural"
            )
        return "structural"


def variant_infos(checkpoints: dict[str, dict[int, Checkpoint]]) -> dict[str, VariantInfo]:
    """variant -> what the evaluation needs to know of it, from its first checkpoint's config and training."""
    infos = {}
    for variant, by_seed in checkpoints.items():
        first = next(iter(by_seed.values()))
        config, family = first.config, first.family
        infos[variant] = VariantInfo(
            variant,
            family,
            first.training.get("augment", "none"),
            config["scan_order"] if family == "mamba_hybrid" else None,
            config["attn_layers"] if family == "mamba_hybrid" else None,
            config["pos_embed"] if family == "vit" else None,
            first.dataset,
        )
    return infos


def trained_points(checkpoints: dict[str, dict[int, Checkpoint]], num_points: int) -> int:
    """The point count the point models trained on (`points_per_cloud`, 0 = every point of the cloud)."""
    counts = set()
    for by_seed in checkpoints.values():
        for ckpt in by_seed.values():
            if ckpt.input_kind == "points":
                per_cloud = int(ckpt.training["points_per_cloud"])
                counts.add(per_cloud if 0 < per_cloud < num_points else num_points)
    return min(counts) if counts else num_points


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
    """variant -> ModelFit on its in-distribution test (`key`: the "rotation", "resolution" or "proximity"
    table's kind)."""
    fits = {}
    for variant, row in table.items():
        if key == "rotation":
            estimate = row["accuracy"][in_distribution_mode(infos[variant].augment)]
        elif key == "proximity":
            estimate = row["accuracy"]
        else:
            estimate = row["accuracy"]["in"]
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
    equivariant model's drop, paired (the weakest case for the claim among the baselines). Two context
    numbers, never deciding: e3nn unrotated against the best un-augmented baseline unrotated, and e3nn under
    SO(3) against the best SO(3)-augmented baseline under SO(3) (None where the study trained none)."""

    def drop(variant: str) -> Estimate:
        modes = correct[variant]
        return linear_effect([per_sample(modes["none"]), per_sample(modes["so3"])], [1.0, -1.0], settings)

    baselines = [v for v in correct if infos[v].family != "e3nn" and infos[v].augment == "none"]
    augmented = [v for v in correct if infos[v].family != "e3nn" and infos[v].augment == "so3"]
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
    augmented_gap, best_augmented = None, ""
    if augmented and equivariant:
        e3nn = equivariant[0]
        best_augmented = max(augmented, key=lambda v: per_sample(correct[v]["so3"]).mean())
        under_so3 = [per_sample(correct[v]["so3"]) for v in (e3nn, best_augmented)]
        augmented_gap = linear_effect(under_so3, [1.0, -1.0], settings)
    used = tuple(fits[v] for v in [*baselines, *equivariant])
    return RotationEvidence(
        models=used,
        baseline_drops=baseline_drops,
        equivariant_drops=equivariant_drops,
        effect=effect,
        equivariant_gap=gap,
        best_baseline=best,
        augmented_gap=augmented_gap,
        best_augmented=best_augmented,
    )


def canvas_set_names(canvases: list[int] | tuple[int, ...]) -> list[str]:
    """The test sets of claim 2, as measured: `in`, then `<kind>_<R>` for every test canvas R."""
    from perception.data.canvas import PLACEMENTS

    return ["in"] + [f"{kind}_{canvas}" for canvas in canvases for kind in PLACEMENTS]


def _drop(correct: dict[str, np.ndarray], kind: str, canvas: int) -> tuple[list[np.ndarray], list[float]]:
    """(arrays, weights) of accuracy(in) - accuracy(test set `kind` at `canvas`), per sample; kind "b" is the
    mean of the centre and corner placements (one test instance, two placements: averaged, not resampled)."""
    base = per_sample(correct["in"])
    if kind == "b":
        centre, corner = (per_sample(correct[f"{p}_{canvas}"]) for p in ("centre", "corner"))
        return [base, centre, corner], [1.0, -0.5, -0.5]
    name = {"a": "fov", "c": "scaled"}[kind]
    return [base, per_sample(correct[f"{name}_{canvas}"])], [1.0, -1.0]


def _combine(*terms: tuple[list[np.ndarray], list[float], float]) -> tuple[list[np.ndarray], list[float]]:
    """The sum of linear effects, each (arrays, weights) times a sign: one (arrays, weights) to bootstrap."""
    arrays, weights = [], []
    for a, w, sign in terms:
        arrays += a
        weights += [sign * x for x in w]
    return arrays, weights


def canvas_tables(
    correct: dict[str, dict[str, np.ndarray]],
    infos: dict[str, VariantInfo],
    canvases: tuple[int, ...],
    train_canvas: int,
    patch_size: int,
    settings: BootstrapSettings,
) -> dict[str, Any]:
    """variant -> accuracy on every test set, and at every canvas the drops of (a) same field of view,
    (b) larger canvas at the training pixel scale, (c) object scaled up, (b)+(c), and (a) - ((b)+(c)): how
    far the usual test's drop is the sum of its two parts. Every number an Estimate dict."""
    table = {}
    for variant, by_set in correct.items():
        info = infos[variant]
        decomposition = {}
        for canvas in canvases:
            a, b, c = (_drop(by_set, k, canvas) for k in ("a", "b", "c"))
            parts = {"a": a, "b": b, "c": c}
            parts["b_plus_c"] = _combine((*b, 1.0), (*c, 1.0))
            parts["a_minus_b_c"] = _combine((*a, 1.0), (*b, -1.0), (*c, -1.0))
            decomposition[str(canvas)] = {k: linear_effect(*v, settings).as_dict() for k, v in parts.items()}
        table[variant] = {
            "family": info.family,
            "pos_embed": info.pos_embed,
            "attn_layers": info.attn_layers,
            "encoding": info.encoding,
            "train_resolution": train_canvas,
            "tokens": {"in": (train_canvas // patch_size) ** 2}
            | {str(canvas): (canvas // patch_size) ** 2 for canvas in canvases},
            "accuracy": {name: accuracy(a, settings).as_dict() for name, a in by_set.items()},
            "by_seed": {name: [round(float(x), 6) for x in a.mean(axis=1)] for name, a in by_set.items()},
            "drops": decomposition,
        }
    return table


def resolution_evidence(
    correct: dict[str, dict[str, np.ndarray]],
    infos: dict[str, VariantInfo],
    fits: dict[str, ModelFit],
    canvases: tuple[int, ...],
    train_canvas: int,
    settings: BootstrapSettings,
) -> ResolutionEvidence | None:
    """Claim 2 on test set (b) at the largest canvas: drop(unhelped learned table) - drop(the structural
    variant that drops most), paired over seeds and instances; the resampled table against the same one."""
    if not canvases:
        return None
    canvas = max(canvases)
    roles = {v: infos[v].encoding for v in correct}
    unhelped = [v for v, r in roles.items() if r == "unhelped"]
    structural = [v for v, r in roles.items() if r == "structural"]
    if not unhelped or not structural:
        return None
    drop_terms = {v: _drop(correct[v], "b", canvas) for v in correct}
    drops = {v: linear_effect(*terms, settings) for v, terms in drop_terms.items()}
    weakest = max(structural, key=lambda v: drops[v].value)

    def against_weakest(variant: str) -> Estimate:
        return linear_effect(*_combine((*drop_terms[variant], 1.0), (*drop_terms[weakest], -1.0)), settings)

    resampled = next((v for v, r in roles.items() if r == "resampled"), "")
    return ResolutionEvidence(
        models=tuple(fits[v] for v in [unhelped[0], *structural]),
        effect=against_weakest(unhelped[0]),
        unhelped=unhelped[0],
        weakest_structural=weakest,
        train_canvas=train_canvas,
        canvas=canvas,
        drops=drops,
        resampled=resampled,
        resampled_effect=against_weakest(resampled) if resampled else None,
    )


def scan_locality(task_grid: int) -> dict[str, Any]:
    """How each order keeps 2D grid neighbours together in 1D, on the proximity task's grid (tokens per side)
    and the essay's largest (1024 px at patch 16). A property of the order by construction: context, never a
    verdict."""
    grids = (task_grid, 1024 // 16)
    return {
        order: {f"locality_{g}x{g}": locality_stats(scan_directions(order, g, g), g, g) for g in grids}
        for order in SCAN_ORDERS
    }


ORIENTATIONS = ("horizontal", "vertical")  # the proximity task's segment axes (test_orientation 0, 1)


def proximity_table(
    correct: dict[str, dict[str, np.ndarray]],
    infos: dict[str, VariantInfo],
    settings: BootstrapSettings,
    orientation: np.ndarray | None = None,
) -> dict[str, Any]:
    """variant -> {family, scan_order, accuracy, by_seed, by_orientation} on the proximity task's test set;
    `orientation` int[N] (0 horizontal, 1 vertical) splits the accuracy by the segments' axis."""
    table = {}
    for variant, by_set in correct.items():
        row: dict[str, Any] = {
            "family": infos[variant].family,
            "scan_order": infos[variant].scan_order if infos[variant].family == "mamba_hybrid" else None,
            "accuracy": accuracy(by_set["in"], settings).as_dict(),
            "by_seed": [round(float(x), 6) for x in by_set["in"].mean(axis=1)],
        }
        if orientation is not None:
            row["by_orientation"] = {
                name: accuracy(by_set["in"][:, orientation == k], settings).as_dict()
                for k, name in enumerate(ORIENTATIONS)
                if (orientation == k).any()
            }
        table[variant] = row
    return table


def serialisation_evidence(
    correct: dict[str, dict[str, np.ndarray]],
    infos: dict[str, VariantInfo],
    fits: dict[str, ModelFit],
    locality: dict[str, float],
    settings: BootstrapSettings,
    orientation: np.ndarray | None = None,
) -> SerialisationEvidence | None:
    """Claim 1 on the proximity task: accuracy(best locality-preserving order) - accuracy(order) for every
    other order of pure Mamba, paired over seeds and test images. The best is chosen on the point estimate;
    each interval is that of its pair."""
    orders: dict[str, str] = {}
    reference = ""
    for v in correct:
        order = infos[v].scan_order
        if infos[v].family == "mamba_hybrid" and order:
            orders.setdefault(order, v)
        elif infos[v].family == "vit":
            reference = reference or v
    preserving = [o for o in LOCALITY_PRESERVING if o in orders]
    if not preserving or len(orders) < 2:
        return None
    at = {o: per_sample(correct[v]["in"]) for o, v in orders.items()}
    best = max(preserving, key=lambda o: at[o].mean())
    effects = {o: linear_effect([at[best], at[o]], [1.0, -1.0], settings) for o in orders if o != best}
    return SerialisationEvidence(
        models=tuple(fits[v] for v in orders.values()),
        best_order=best,
        effects=effects,
        accuracies={o: accuracy(correct[v]["in"], settings) for o, v in orders.items()},
        locality={o: locality[o] for o in orders if o in locality},
        reference=reference,
        reference_accuracy=accuracy(correct[reference]["in"], settings) if reference else None,
        by_orientation={}
        if orientation is None
        else {
            f"{o}, {name}": accuracy(correct[v]["in"][:, orientation == k], settings)
            for o, v in orders.items()
            for k, name in enumerate(ORIENTATIONS)
            if (orientation == k).any()
        },
    )


def cost_evidence(cost: dict[str, Any]) -> CostEvidence:
    """Claim 3 from the measured cost sweep (`perception.evaluation.cost.CostStudy.as_dict()`): latency
    exponents over the upper sweep with bootstrap intervals over timing repeats, their ViT - Mamba gap, the
    peak-memory exponents of fused and explicit attention and of Mamba (context), the crossover, and how
    busy the machine was while the fitted rows were timed (the busy gate)."""

    def estimate(d: dict[str, Any] | None) -> Estimate | None:
        return None if d is None else Estimate(float(d["value"]), float(d["lo"]), float(d["hi"]))

    fits = cost["fits"]
    memory = {
        name: Estimate(float(m["value"]), float(m["lo"]), float(m["hi"]))
        for name in ("vit", "vit_explicit", "mamba")
        if name in fits and (m := fits[name]["memory"]) is not None
    }
    busiest = cost.get("busiest")
    return CostEvidence(
        latency_exponent_gap=estimate(cost.get("latency_gap")),
        vit_latency_exponent=estimate(fits.get("vit", {}).get("latency")),
        mamba_latency_exponent=estimate(fits.get("mamba", {}).get("latency")),
        memory_exponents=memory,
        crossover_tokens=cost.get("crossover_tokens"),
        others_cpu=None if busiest is None else float(busiest["others_cpu"]),
        busiest_row="" if busiest is None else f"{busiest['model']} at {busiest['tokens']} tokens",
        gpu_other_processes=None if busiest is None else busiest["gpu_other_processes"],
    )


def per_model_test_metrics(
    checkpoints: dict[str, dict[int, Checkpoint]],
    correct_by_kind: list[dict[str, dict[str, np.ndarray]]],
    settings: BootstrapSettings,
) -> dict[str, dict[int, dict[str, float]]]:
    """variant -> seed -> its test accuracies (percent, with intervals over test samples) under the names
    every model shares (`metric_names.test_metric_name`), from the rotation, canvas and proximity
    arrays."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for correct in correct_by_kind:
        for variant, by_set in correct.items():
            seeds = list(checkpoints[variant])  # the arrays' seed axis, in this order
            dataset = next(iter(checkpoints[variant].values())).dataset
            for index, seed in enumerate(seeds):
                out.setdefault(variant, {}).setdefault(seed, {}).update(
                    metric_names.trial_test_metrics(by_set, dataset, index, lambda c: accuracy(c, settings))
                )
    return out


def deployment_conditions(canvases: tuple[int, ...]) -> dict[str, list[dict[str, str]]]:
    """task -> its conditions in the decision table ({name, label}), in order; the larger canvas is the
    largest test canvas, object at training scale (test set (b): centre and corner, averaged per instance)."""
    images = {"in_distribution": "in distribution (the training canvas)"}
    if canvases:
        images[f"canvas_{max(canvases)}"] = f"a larger canvas ({max(canvases)} px, object at training scale)"
    named = {
        "points": {"unrotated": "unrotated", "so3": "arbitrary rotation (SO(3))"},
        "images": images,
        "proximity": {"in_distribution": "the proximity task (claim 1)"},
    }
    return {task: [{"name": n, "label": label} for n, label in c.items()] for task, c in named.items()}


def deployment_table(
    costs: dict[str, Any],
    rotation: dict[str, dict[str, np.ndarray]],
    canvas: dict[str, dict[str, np.ndarray]],
    proximity: dict[str, dict[str, np.ndarray]],
    infos: dict[str, VariantInfo],
    canvases: tuple[int, ...],
    settings: BootstrapSettings,
    machine: str,
    reference_ms: tuple[float, float, float],
) -> dict[str, Any]:
    """The deployment table (`results.DeploymentTable`) measured on `machine`, whose fixed reference workload
    took `reference_ms` (median, interval) in the same rounds: variant -> its deployment
    cost (a `perception.evaluation.deployment.DeploymentCost` dict) with its task and its accuracy (an
    Estimate dict, over seeds and test samples) under each of its task's conditions
    (`deployment_conditions`)."""
    conditions = deployment_conditions(canvases)
    models = {}
    for variant, cost in costs.items():
        task = infos[variant].dataset
        if task == "points":
            arrays = {"unrotated": rotation[variant]["none"], "so3": rotation[variant]["so3"]}
        elif task == "images":
            arrays = {"in_distribution": canvas[variant]["in"]}
            if canvases:
                big = max(canvases)
                # centre and corner are two draws of one instance: averaged per sample, never resampled
                pair = [canvas[variant][f"{where}_{big}"] for where in ("centre", "corner")]
                arrays[f"canvas_{big}"] = np.stack(pair, axis=-1)  # [S, N, 2]
        else:
            arrays = {"in_distribution": proximity[variant]["in"]}
        models[variant] = {
            **cost,
            "task": task,
            "family": infos[variant].family,
            "accuracy": {name: accuracy(a, settings).as_dict() for name, a in arrays.items()},
        }
    first: dict[str, Any] = next(iter(costs.values()), {})
    return {
        "machine": machine,
        "reference_ms": list(reference_ms),
        "device": first.get("device", ""),
        "threads": first.get("threads", 0),
        "conditions": conditions,
        "models": models,
    }


def deployment_metrics(cost: Any) -> dict[str, float]:
    """A model's deployment cost as MLflow metrics, under the names every trial run shares."""
    return {
        "latency_ms": cost.latency_ms,
        "latency_ms_lo": cost.latency_ms_lo,
        "latency_ms_hi": cost.latency_ms_hi,
        "throughput_per_s": cost.throughput_per_s,
        "peak_memory_mb": cost.peak_memory_mb,
        "parameters": float(cost.parameters),
        "checkpoint_mb": cost.checkpoint_bytes / 2**20,
    }
