"""Stage `evaluate`: the four claims measured on the trained models, for DVC, MLflow and the report.

- Rotation generalisation: every point model on the test set with no rotation, rotations about the up axis
  and Haar-uniform SO(3) rotations (several per sample, seeded); accuracy against the rotation angle; the
  model's float64 invariance error.
- Resolution (claim 2): every shape-image model on the training distribution and on the paired test sets
  of every test canvas: (a) same field of view with more pixels, (b) a larger canvas at the training pixel
  scale (object centred and in the far corner), (c) the object scaled up on the training canvas.
- Resolution scaling, cost: ViT, Mamba-hybrid and pure Mamba at one width and depth over token counts.
- Serialisation (claim 1): the proximity-task models' accuracy per scan order, and how each order keeps
  grid neighbours together.

Outputs: `<out>/results.json` (everything), `<out>/figures/*.png`, `<metrics>` (headline numbers for
`dvc metrics`), and `<plots>/*.csv` (for `dvc plots`); the same numbers and figures go to the study's MLflow
parent run.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perception.data.arrays import open_dataset
from perception.evaluation.intervals import BootstrapSettings
from perception.ops.serialization import SCAN_ORDERS, locality_stats, scan_directions
from pipeline import evidence, review
from pipeline.config import StudyConfig
from pipeline.evidence import VariantInfo, evidence_dict, fit_dict
from pipeline.measurements import (
    Checkpoint,
    load_checkpoints,
    measure_images,
    measure_rotation,
    save_arrays,
    with_unhelped_tables,
)
from pipeline.mlflow_store import check_reachable, retrying
from pipeline.outputs import atomic_output_dir, read_json, write_json_atomic
from pipeline.stages.prepare_images import canvas_set_file


def _infos(checkpoints: dict[str, dict[int, Checkpoint]]) -> dict[str, VariantInfo]:
    infos = {}
    for variant, by_seed in checkpoints.items():
        flat = next(iter(by_seed.values())).flat
        infos[variant] = VariantInfo(
            variant,
            flat["trial.family"],
            flat.get("trial.augment", "none"),
            flat.get("trial.scan_order", "rowmajor") if flat["trial.family"] == "mamba_hybrid" else None,
            flat.get("trial.attn_layers"),
            flat.get("trial.pos_embed", "learned") if flat["trial.family"] == "vit" else None,
            next(iter(by_seed.values())).dataset,
        )
    return infos


def _trained_points(checkpoints: dict[str, dict[int, Checkpoint]], num_points: int) -> int:
    """The point count the point models trained on (`points_per_cloud`, 0 = every point of the cloud)."""
    counts = set()
    for by_seed in checkpoints.values():
        for ckpt in by_seed.values():
            if ckpt.input_kind == "points":
                per_cloud = int(ckpt.flat.get("trial.points_per_cloud", ckpt.flat["train.points_per_cloud"]))
                counts.add(per_cloud if 0 < per_cloud < num_points else num_points)
    return min(counts) if counts else num_points


def _locality(config: StudyConfig) -> dict[str, Any]:
    """How each order keeps 2D grid neighbours together in 1D, on the proximity task's grid and the essay's
    largest (1024 px at patch 16). A property of the order by construction: context, never a verdict."""
    grids = (config.proximity.size // config.proximity.patch_size, 1024 // 16)
    return {
        order: {f"locality_{g}x{g}": locality_stats(scan_directions(order, g, g), g, g) for g in grids}
        for order in SCAN_ORDERS
    }


def _cost(config: StudyConfig, settings: BootstrapSettings) -> dict[str, Any]:
    """ViT (fused and explicit attention), Mamba-hybrid and pure Mamba timed over token counts; on a GPU
    machine the sweep measures the GPU (latency and the CUDA allocator's peak)."""
    from perception.evaluation.cost import cost_study

    ev = config.evaluate
    study = cost_study(
        ev.cost_dim,
        ev.cost_depth,
        ev.cost_heads,
        ev.cost_patch_size,
        ev.cost_resolutions,
        torch.device("cuda" if torch.cuda.is_available() else "cpu"),
        settings.seed,
        settings.resamples,
        progress=lambda line: print(f"evaluate: {line}", flush=True),
        min_run_time=ev.cost_min_run_time,
        min_blocks=ev.cost_min_blocks,
        fit_min_tokens=ev.cost_fit_min_tokens,
        level=settings.level,
    )
    return study.as_dict()


def evaluate(
    config: StudyConfig,
    points_dir: Path,
    images_dir: Path,
    proximity_dir: Path,
    train_dir: Path,
    out: Path,
    metrics_out: Path,
    plots_dir: Path,
) -> dict[str, Any]:
    points = open_dataset(points_dir, "points")
    images = open_dataset(images_dir, "images")
    proximity = open_dataset(proximity_dir, "images")
    study = read_json(train_dir / "study.json", "train") if (train_dir / "study.json").is_file() else {}
    # ViT's learned table is read two ways, resampled and at its own positions, from the same checkpoints.
    checkpoints = with_unhelped_tables(load_checkpoints(train_dir))
    tracking = study.get("mlflow") or {}
    if tracking.get("parent_run_id"):
        check_reachable(tracking["tracking_uri"], f"the study's tracking store ({train_dir / 'study.json'})")
    began = time.monotonic()
    ev = config.evaluate
    settings = BootstrapSettings(ev.bootstrap_resamples, ev.bootstrap_seed)
    infos = _infos(checkpoints)
    num_classes = len(points.manifest["classes"])
    train_res = config.images.train_resolution

    rotation = measure_rotation(
        checkpoints,
        points.array("test_points"),
        points.array("test_labels"),
        draws=ev.rotation_draws,
        data_seed=config.seed,
        batch_size=ev.batch_size,
        invariance_clouds=ev.invariance_clouds,
        trained_points=_trained_points(checkpoints, config.points.num_points),
    )
    canvases = tuple(r for r in config.images.resolutions if r != train_res)
    canvas_names = evidence.canvas_set_names(canvases)
    canvas_sets = {"in": images.array(canvas_set_file("in", train_res, train_res))}
    for name in canvas_names[1:]:
        kind, canvas = name.rsplit("_", 1)
        canvas_sets[name] = images.array(canvas_set_file(kind, int(canvas), train_res))
    canvas = measure_images(
        checkpoints, canvas_sets, images.array("test_labels"), dataset="images", batch_size=ev.batch_size
    )
    size = config.proximity.size
    prox = measure_images(
        checkpoints,
        {"in": proximity.array(f"test_r{size}")},
        proximity.array("test_labels"),
        dataset="proximity",
        batch_size=ev.batch_size,
    )

    rotation_table = evidence.rotation_tables(rotation.correct, infos, settings)
    for variant, row in rotation_table.items():
        row["invariance_error_float64"] = rotation.invariance_error[variant]
        row["angle_bins"] = {
            mode: evidence.angle_bins(rotation.correct[variant][mode], rotation.angles[mode], settings)
            for mode in ("z", "so3")
        }
    resolution_table = evidence.canvas_tables(
        canvas.correct, infos, canvases, train_res, config.images.patch_size, settings
    )
    orientation = proximity.array("test_orientation")
    proximity_table = evidence.proximity_table(prox.correct, infos, settings, orientation)
    fits = {
        **evidence.model_fits(rotation_table, infos, num_classes, "rotation"),
        **evidence.model_fits(resolution_table, infos, num_classes, "resolution"),
        **evidence.model_fits(proximity_table, infos, 2, "proximity"),
    }
    locality = _locality(config)
    task_grid = list(locality["rowmajor"])[0]
    for row in proximity_table.values():
        order = row["scan_order"]
        row["locality"] = locality[order][task_grid] if order else None
    claim_evidence = {
        "serialisation": evidence.serialisation_evidence(
            prox.correct,
            infos,
            fits,
            {o: stats[task_grid]["grid_nbr_within_window_frac"] for o, stats in locality.items()},
            settings,
            orientation,
        ),
        "position_embedding": evidence.resolution_evidence(
            canvas.correct, infos, fits, canvases, train_res, settings
        ),
        "rotation": evidence.rotation_evidence(rotation.correct, infos, fits, settings),
    }
    cost = _cost(config, settings)
    claim_evidence["cost"] = evidence.cost_evidence(cost)

    results: dict[str, Any] = {
        "schema_version": 2,
        "seed": config.seed,
        "seeds": sorted({s for by_seed in checkpoints.values() for s in by_seed}),
        "evaluate": dict(vars(ev)),
        "num_classes": num_classes,
        "test_samples": {
            "points": int(len(points.array("test_labels"))),
            "images": int(len(images.array("test_labels"))),
            "proximity": int(len(proximity.array("test_labels"))),
        },
        "canvas": {
            "train_resolution": train_res,
            "object_size": config.images.object_size,
            "canvases": list(canvases),
            "test_sets": canvas_names,
        },
        "points_per_cloud": rotation.points_per_cloud,
        "bootstrap": {
            "method": settings.describe(),
            "resamples": settings.resamples,
            "seed": settings.seed,
            "level": settings.level,
        },
        "models": {name: fit_dict(fit) for name, fit in fits.items()},
        "rotation": rotation_table,
        "resolution": resolution_table,
        "serialisation": {
            "orders": locality,
            "task_grid": task_grid,
            "task": dict(vars(config.proximity)),
            "models": proximity_table,
        },
        "cost": cost,
        "evidence": {name: evidence_dict(e) for name, e in claim_evidence.items() if e is not None},
        "wall_seconds": round(time.monotonic() - began, 1),
        "mlflow": study.get("mlflow", {}),
    }

    metrics = headline_metrics(results)
    plots = plot_tables(results)
    with atomic_output_dir(out) as folder:
        (folder / "results.json").write_text(
            json.dumps(results, indent=2, sort_keys=True, default=_json) + "\n"
        )
        save_arrays(folder / "per_sample.npz", rotation, canvas, prox)
        (folder / "figures").mkdir()
        from pipeline.figures import draw_figures

        figures = draw_figures(results, folder / "figures")
    with atomic_output_dir(plots_dir) as folder:
        for name, rows in plots.items():
            _write_csv(folder / f"{name}.csv", rows)
    write_json_atomic(metrics_out, metrics)
    tables = [out / "results.json"] + [plots_dir / f"{name}.csv" for name in plots]
    if tracking.get("parent_run_id"):
        figure_paths = [out / "figures" / f.name for f in figures]
        per_model = per_model_test_metrics(
            checkpoints, [rotation.correct, canvas.correct, prox.correct], settings
        )
        runs = trial_runs(train_dir)
        # A derived reading (vit-learned_fixed) is tested on the shape canvases: its runs' input.
        in_file = Path(images_dir) / f"{canvas_set_file('in', train_res, train_res)}.npy"
        image_inputs = [
            review.dataset_input(
                "images",
                "test",
                canvas_sets["in"],
                images.array("test_labels"),
                in_file,
                images.manifest_sha256,
            )
        ]
        retrying(
            lambda: _log_to_mlflow(
                tracking, per_model, runs, results["cost"]["rows"], tables, figure_paths, image_inputs
            ),
            "logging the evaluation",
            tracking["tracking_uri"],
            config.mlflow.wait_seconds,
            print,
        )
    else:
        print("evaluate: no MLflow parent run in the train outputs; skipping MLflow")
    print(f"evaluate: done in {results['wall_seconds']:.0f} s -> {out}, {metrics_out}, {plots_dir}")
    return results


def _json(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _with_interval(name: str, estimate: dict[str, float]) -> dict[str, float | None]:
    """`name`, `name_lo`, `name_hi` from an estimate dict (no NaN: JSON has none)."""

    def clean(x: float | None) -> float | None:
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 6)

    return {
        name: clean(estimate.get("value")),
        f"{name}_lo": clean(estimate.get("lo")),
        f"{name}_hi": clean(estimate.get("hi")),
    }


def headline_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """The numbers `dvc metrics show` lists and `dvc metrics diff` compares; every one with its interval."""
    rotation = {
        name: {
            **{
                k: v
                for mode, estimate in r["accuracy"].items()
                for k, v in _with_interval(f"accuracy_{mode}", estimate).items()
            },
            "invariance_error_float64": float(f"{r['invariance_error_float64']:.3e}"),
        }
        for name, r in results["rotation"].items()
    }
    resolution = {
        name: {
            **{
                k: v
                for test_set, estimate in r["accuracy"].items()
                for k, v in _with_interval(f"accuracy_{test_set}", estimate).items()
            },
            **{
                k: v
                for canvas, parts in r["drops"].items()
                for part, estimate in parts.items()
                for k, v in _with_interval(f"drop_{part}_{canvas}", estimate).items()
            },
        }
        for name, r in results["resolution"].items()
    }
    serialisation = {
        name: _with_interval("accuracy", r["accuracy"])
        for name, r in results["serialisation"]["models"].items()
    }
    cost = {
        model: {
            k: v
            for key, estimate in fits.items()
            if isinstance(estimate, dict) and "value" in estimate
            for k, v in _with_interval(f"{key}_exponent", estimate).items()
        }
        for model, fits in results["cost"]["fits"].items()
    }
    effects = {
        claim: _with_interval("effect", e["effect"])
        for claim, e in results["evidence"].items()
        if isinstance(e.get("effect"), dict)
    }
    gap = results["evidence"].get("rotation", {}).get("equivariant_gap")
    if isinstance(gap, dict):  # context: e3nn unrotated - the best un-augmented baseline
        effects.setdefault("rotation", {}).update(_with_interval("equivariant_gap", gap))
    for claim, key in (("serialisation", "effects"), ("position_embedding", "drops")):
        for name, estimate in (results["evidence"].get(claim, {}).get(key) or {}).items():
            effects.setdefault(claim, {}).update(_with_interval(f"{key}.{name}", estimate))
    return {
        "rotation": rotation,
        "resolution": resolution,
        "serialisation": serialisation,
        "cost": cost,
        "effects": effects,
    }


def plot_tables(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Long-format rows for `dvc plots` (one CSV per plot), each y with its interval (`_lo`, `_hi`)."""
    by_angle = []
    for name, r in results["rotation"].items():
        for mode in ("z", "so3"):
            for b in r["angle_bins"][mode]:
                if "value" in b:
                    centre = (b["low_deg"] + b["high_deg"]) / 2
                    by_angle.append(
                        {
                            "model": f"{name} ({mode})",
                            "angle_deg": centre,
                            "accuracy": b["value"],
                            "accuracy_lo": b["lo"],
                            "accuracy_hi": b["hi"],
                        }
                    )
    by_scale = []
    canvas = results["canvas"]
    train_res = canvas["train_resolution"]
    for name, r in results["resolution"].items():
        for kind in ("fov", "centre", "corner", "scaled"):
            points = [(1.0, r["accuracy"]["in"])] + [
                (c / train_res, r["accuracy"][f"{kind}_{c}"]) for c in canvas["canvases"]
            ]
            for scale, acc in points:
                by_scale.append(
                    {
                        "model": f"{name} ({kind})",
                        "scale": scale,
                        "accuracy": acc["value"],
                        "accuracy_lo": acc["lo"],
                        "accuracy_hi": acc["hi"],
                    }
                )
    by_order = [
        {
            "model": name,
            "locality": row["locality"]["grid_nbr_within_window_frac"],
            "accuracy": row["accuracy"]["value"],
            "accuracy_lo": row["accuracy"]["lo"],
            "accuracy_hi": row["accuracy"]["hi"],
        }
        for name, row in results["serialisation"]["models"].items()
        if row["locality"]  # the attention reference has no order, so no locality to plot against
    ]
    by_tokens = [
        {
            "model": row["model"],
            "tokens": row["tokens"],
            "latency_ms": row["latency_ms"],
            "latency_ms_lo": row["latency_ms_lo"],
            "latency_ms_hi": row["latency_ms_hi"],
            "peak_memory_mb": row["peak_memory_mb"],
            "flops_total": row["flops_total"],
        }
        for row in results["cost"]["rows"]
    ]
    return {
        "accuracy_by_angle": by_angle,
        "accuracy_by_scale": by_scale,
        "accuracy_by_scan_order": by_order,
        "cost_by_tokens": by_tokens,
    }


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["model"])
        writer.writeheader()
        writer.writerows(rows)


def per_model_test_metrics(
    checkpoints: dict[str, dict[int, Checkpoint]],
    correct_by_kind: list[dict[str, dict[str, np.ndarray]]],
    settings: BootstrapSettings,
) -> dict[str, dict[int, dict[str, float]]]:
    """variant -> seed -> its test accuracies (percent, with intervals over test samples) under the names
    every model shares (`pipeline.review.test_metric_name`), from the rotation, canvas and proximity
    arrays."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for correct in correct_by_kind:
        for variant, by_set in correct.items():
            seeds = list(checkpoints[variant])  # the arrays' seed axis, in this order
            dataset = next(iter(checkpoints[variant].values())).dataset
            for index, seed in enumerate(seeds):
                out.setdefault(variant, {}).setdefault(seed, {}).update(
                    review.trial_test_metrics(
                        by_set, dataset, index, lambda c: evidence.accuracy(c, settings)
                    )
                )
    return out


def trial_runs(train_dir: Path) -> dict[tuple[str, int], str]:
    """(variant, seed) -> the MLflow run of the trial whose checkpoint was evaluated (study.json)."""
    study = read_json(train_dir / "study.json", "train")
    return {
        (variant, int(seed)): best.get("mlflow_run_id", "")
        for variant, by_seed in study.get("variants", {}).items()
        for seed, best in by_seed.items()
    }


def _log_to_mlflow(
    tracking: dict,
    per_model: dict[str, dict[int, dict[str, float]]],
    runs: dict[tuple[str, int], str],
    cost_rows: list[dict[str, Any]],
    tables: list[Path],
    figures: list[Path],
    derived_inputs: list,
) -> None:
    """Each evaluated model's test numbers on its own run (a derived reading, like `vit-learned_fixed`, on a
    run of its own beside the trial it reads); the cost sweep as a run per model; tables and figures on the
    study's parent run. The claim-level numbers go to the parent in the report stage."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking["tracking_uri"])
    parent_id = tracking["parent_run_id"]
    source = review.source_tags("evaluate", client.get_run(parent_id).data.tags.get("git_commit", ""))
    for variant, by_seed in per_model.items():
        for seed, metrics in by_seed.items():
            run_id = runs.get((variant, seed))
            if not run_id:  # not trained: read from another variant's weights
                tags = {"variant": variant, "seed": str(seed), "kind": "derived", **source}
                run_id = review.child_run(client, parent_id, f"{variant}-s{seed}", tags, derived_inputs)
            review.log_metrics(client, run_id, metrics)
    review.log_cost_sweep(client, parent_id, cost_rows, source)
    for table in tables:
        client.log_artifact(parent_id, str(table), "evaluation")
    review.log_figures(client, parent_id, figures)
