"""Stage `evaluate`: the four claims measured on the trained models, for DVC, MLflow and the report.

- Rotation generalisation: every point model on the test set with no rotation, rotations about the up axis
  and Haar-uniform SO(3) rotations (several per sample, seeded); accuracy against the rotation angle; the
  model's float64 invariance error.
- Resolution scaling, accuracy: every image model on the test renders at every resolution (ViT with its
  position grid resampled, Mamba as it is).
- Resolution scaling, cost: ViT, Mamba-hybrid and pure Mamba at one width and depth over token counts.
- Serialisation: the Mamba model's accuracy per `scan_order`, and how each order keeps grid neighbours.

Outputs: `<out>/results.json` (everything), `<out>/figures/*.png`, `<metrics>` (headline numbers for
`dvc metrics`), and `<plots>/*.csv` (for `dvc plots`); the same numbers and figures go to the study's MLflow
parent run.
"""

from __future__ import annotations

import csv
import json
import math
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perception.data.arrays import DatasetError, open_dataset
from perception.models import FAMILIES
from perception.ops.serialization import locality_stats, scan_order
from perception.training import accuracy
from pipeline.config import StudyConfig
from pipeline.mlflow_store import check_reachable, retrying
from pipeline.outputs import atomic_output_dir, read_json, write_json_atomic


def _load_models(train_dir: Path) -> dict[str, tuple[torch.nn.Module, dict, dict]]:
    """Every best checkpoint of the train stage: variant -> (model in eval mode, flat config, state_dict)."""
    from pipeline.training.trainable import build_model

    folder = train_dir / "models"
    if not folder.is_dir():
        raise DatasetError(f"{folder}: missing; run the train stage first (dvc repro train)")
    models = {}
    for path in sorted(folder.glob("*.pt")):
        try:
            # weights_only: a checkpoint carrying arbitrary pickled objects is refused, never run.
            state = torch.load(path, map_location="cpu", weights_only=True)
            model = build_model(state["config"])
            model.load_state_dict(state["state_dict"])
        except (
            OSError,
            EOFError,
            RuntimeError,
            KeyError,
            TypeError,
            ValueError,  # hparams the family's config refuses (ModelConfigError), e.g. an unknown size
            pickle.UnpicklingError,
        ) as err:
            # load_state_dict puts the first mismatch ("size mismatch for head.weight: ...") on line two.
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            reason = " ".join(lines[:2])[:300] if lines else type(err).__name__
            raise DatasetError(
                f"{path}: not a usable checkpoint of the train stage ({reason}); rerun `dvc repro -f train`"
            ) from None
        models[path.stem] = (model.eval(), state["config"], state["state_dict"])
    if not models:
        raise DatasetError(f"{folder}: holds no checkpoints; rerun the train stage")
    return models


def _float64_model(flat: dict, state: dict) -> torch.nn.Module:
    """The trained model rebuilt in float64 throughout.

    `.double()` alone leaves constants that e3nn computes at build time (change-of-basis and Clebsch-Gordan
    tensors) in float32, which caps a measured invariance error near 1e-10; building under a float64
    default dtype measures the model's own error.
    """
    from pipeline.training.trainable import build_model

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = build_model(flat)
    finally:
        torch.set_default_dtype(default)
    # Constant buffers (e3nn's Clebsch-Gordan and basis tensors) were saved in float32: keep the float64
    # ones built here where they agree to float32 precision; load every trained value.
    built = dict(model.named_buffers())
    trained = {
        key: value
        for key, value in state.items()
        if not (
            key in built and built[key].is_floating_point() and torch.equal(built[key].to(value.dtype), value)
        )
    }
    model.load_state_dict(trained, strict=False)  # float32 values are copied into float64 tensors
    return model.eval()


def _rotation(config: StudyConfig, models, points) -> dict[str, Any]:
    from perception.evaluation.rotation import evaluate_rotations, invariance_error

    ev = config.evaluate
    test_points = torch.from_numpy(points.array("test_points"))
    labels = torch.from_numpy(points.array("test_labels"))
    out = {}
    for name, (model, flat, state) in models.items():
        if FAMILIES[flat["trial.family"]].input_kind != "points":
            continue
        results = evaluate_rotations(
            model, test_points, labels, draws=ev.rotation_draws, seed=config.seed, batch_size=ev.batch_size
        )
        clouds = test_points[: ev.invariance_clouds]
        out[name] = {
            "family": flat["trial.family"],
            "augment": flat.get("trial.augment", "none"),
            "modes": {mode: result.as_dict() for mode, result in results.items()},
            "invariance_error_float64": invariance_error(
                _float64_model(flat, state), clouds, rotations=4, seed=config.seed
            ),
        }
        print(
            f"evaluate: {name:24s} accuracy none {results['none'].accuracy:.3f}"
            f"  z {results['z'].accuracy:.3f}"
            f"  so3 {results['so3'].accuracy:.3f} ± {results['so3'].accuracy_std:.3f}"
            f"  invariance error {out[name]['invariance_error_float64']:.1e}",
            flush=True,
        )
    return out


def _resolution(config: StudyConfig, models, images) -> dict[str, Any]:
    labels = torch.from_numpy(images.array("test_labels"))
    renders = {res: torch.from_numpy(images.array(f"test_r{res}")) for res in config.images.resolutions}
    out = {}
    for name, (model, flat, _) in models.items():
        if FAMILIES[flat["trial.family"]].input_kind != "image":
            continue
        by_res = {}
        for res, x in renders.items():
            by_res[str(res)] = accuracy(model, x, labels, config.evaluate.batch_size, torch.device("cpu"))
        out[name] = {
            "family": flat["trial.family"],
            "scan_order": flat.get("trial.scan_order"),
            "train_resolution": config.images.train_resolution,
            "tokens": {str(r): (r // config.images.patch_size) ** 2 for r in renders},
            "accuracy": by_res,
        }
        shown = "  ".join(f"{r}px {a:.3f}" for r, a in by_res.items())
        print(f"evaluate: {name:24s} {shown}", flush=True)
    return out


def _serialisation(config: StudyConfig, resolution: dict[str, Any]) -> dict[str, Any]:
    # The training grid, and the essay's largest image: 1024 px at patch 16.
    grids = (config.images.train_resolution // config.images.patch_size, 1024 // 16)
    orders = {
        order: {f"locality_{g}x{g}": locality_stats(scan_order(order, g, g), g, g) for g in grids}
        for order in ("rowmajor", "snake", "hilbert")
    }
    accuracy_by_order = {
        row["scan_order"]: row["accuracy"][str(config.images.train_resolution)]
        for row in resolution.values()
        if row["family"] == "mamba_hybrid" and row["scan_order"]
    }
    return {"orders": orders, "mamba_accuracy": accuracy_by_order}


def _cost(config: StudyConfig) -> dict[str, Any]:
    from perception.evaluation.cost import (
        cost_sweep,
        default_cost_models,
        essay_rows,
        fit_exponent,
        loglog_slopes,
    )

    ev = config.evaluate
    factories = default_cost_models(
        dim=ev.cost_dim, depth=ev.cost_depth, heads=ev.cost_heads, patch_size=ev.cost_patch_size
    )
    points = cost_sweep(
        factories,
        resolutions=ev.cost_resolutions,
        patch_size=ev.cost_patch_size,
        repeats=ev.cost_repeats,
        # On a GPU machine the sweep measures the GPU (latency and the CUDA allocator's peak).
        device=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
        progress=lambda line: print(f"evaluate: {line}", flush=True),
    )
    rows = [p.as_dict() for p in points]
    fits = {}
    for model in factories:
        mine = [r for r in rows if r["model"] == model]
        tokens = [r["tokens"] for r in mine]
        fits[model] = {
            key: {
                "exponent": fit_exponent(tokens, [r[key] for r in mine]),
                "slopes": loglog_slopes(tokens, [r[key] for r in mine]),
            }
            for key in ("latency_ms", "flops_total", "peak_memory_mb")
        }
    return {
        "setting": {
            "dim": ev.cost_dim,
            "depth": ev.cost_depth,
            "heads": ev.cost_heads,
            "patch_size": ev.cost_patch_size,
            "repeats": ev.cost_repeats,
        },
        "rows": rows,
        "fits": fits,
        "essay": essay_rows(),
    }


def evaluate(
    config: StudyConfig,
    points_dir: Path,
    images_dir: Path,
    train_dir: Path,
    out: Path,
    metrics_out: Path,
    plots_dir: Path,
) -> dict[str, Any]:
    points = open_dataset(points_dir, "points")
    images = open_dataset(images_dir, "images")
    study = read_json(train_dir / "study.json", "train") if (train_dir / "study.json").is_file() else {}
    models = _load_models(train_dir)
    tracking = study.get("mlflow") or {}
    if tracking.get("parent_run_id"):
        check_reachable(tracking["tracking_uri"], f"the study's tracking store ({train_dir / 'study.json'})")
    began = time.monotonic()

    results: dict[str, Any] = {"seed": config.seed, "evaluate": dict(vars(config.evaluate))}
    results["rotation"] = _rotation(config, models, points)
    results["resolution"] = _resolution(config, models, images)
    results["serialisation"] = _serialisation(config, results["resolution"])
    results["cost"] = _cost(config)
    results["wall_seconds"] = round(time.monotonic() - began, 1)
    results["mlflow"] = study.get("mlflow", {})

    metrics = headline_metrics(results)
    plots = plot_tables(results)
    with atomic_output_dir(out) as folder:
        (folder / "results.json").write_text(
            json.dumps(results, indent=2, sort_keys=True, default=_json) + "\n"
        )
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
        retrying(
            lambda: _log_to_mlflow(tracking, metrics, tables, figure_paths),
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


def headline_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """The numbers `dvc metrics show` lists and `dvc metrics diff` compares (no NaN: JSON has none)."""

    def clean(x: float) -> float | None:
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 6)

    rotation = {
        name: {
            **{f"accuracy_{mode}": clean(r["modes"][mode]["accuracy"]) for mode in r["modes"]},
            "accuracy_so3_std": clean(r["modes"]["so3"]["accuracy_std"]),
            "invariance_error_float64": float(f"{r['invariance_error_float64']:.3e}"),
        }
        for name, r in results["rotation"].items()
    }
    resolution = {
        name: {f"accuracy_{res}px": clean(acc) for res, acc in r["accuracy"].items()}
        for name, r in results["resolution"].items()
    }
    cost = {
        model: {f"{key}_exponent": clean(fit["exponent"]) for key, fit in fits.items()}
        for model, fits in results["cost"]["fits"].items()
    }
    return {"rotation": rotation, "resolution": resolution, "cost": cost}


def plot_tables(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Long-format rows for `dvc plots` (one CSV per plot; log10 columns for the log-log plots)."""
    by_angle = []
    for name, r in results["rotation"].items():
        for mode in ("z", "so3"):
            for b in r["modes"][mode]["angle_bins"]:
                if b["count"]:
                    centre = (b["low_deg"] + b["high_deg"]) / 2
                    by_angle.append(
                        {"model": f"{name} ({mode})", "angle_deg": centre, "accuracy": b["accuracy"]}
                    )
    by_res = [
        {"model": name, "resolution": int(res), "accuracy": acc}
        for name, r in results["resolution"].items()
        for res, acc in r["accuracy"].items()
    ]
    by_tokens = [
        {
            "model": row["model"],
            "tokens": row["tokens"],
            "latency_ms": row["latency_ms"],
            "peak_memory_mb": row["peak_memory_mb"],
            "flops_total": row["flops_total"],
        }
        for row in results["cost"]["rows"]
    ]
    return {"accuracy_by_angle": by_angle, "accuracy_by_resolution": by_res, "cost_by_tokens": by_tokens}


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["model"])
        writer.writeheader()
        writer.writerows(rows)


def _log_to_mlflow(tracking: dict, metrics: dict, tables: list[Path], figures: list[Path]) -> None:
    """Evaluation numbers, tables (results.json, the plot data) and figures to the study's parent run."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=tracking["tracking_uri"])
    run_id = tracking["parent_run_id"]
    now = int(time.time() * 1000)
    flat = _flatten_numbers(metrics, "eval.")
    batch = [Metric(k, v, now, 0) for k, v in flat.items()]
    for i in range(0, len(batch), 500):
        client.log_batch(run_id, metrics=batch[i : i + 500])
    for table in tables:
        client.log_artifact(run_id, str(table), "evaluation")
    for figure in figures:
        client.log_artifact(run_id, str(figure), "evaluation/figures")


def _flatten_numbers(tree: dict, prefix: str) -> dict[str, float]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, int | float) and value is not None and math.isfinite(value):
            flat[f"{prefix}{key}"] = float(value)
    return flat
