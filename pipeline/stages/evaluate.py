"""Stage `evaluate`: the four claims measured on the trained models, for DVC, MLflow and the report.

- Rotation generalisation: every point model on the test set with no rotation, rotations about the up axis
  and Haar-uniform SO(3) rotations (several per sample, seeded); accuracy against the rotation angle; the
  model's float64 invariance error.
- Resolution (claim 2): every shape-image model on the training distribution and on the paired test sets
  of every test canvas: (a) same field of view with more pixels, (b) a larger canvas at the training pixel
  scale (object centred and in the far corner), (c) the object scaled up on the training canvas.
- Resolution scaling, cost: ViT, Mamba-hybrid and pure Mamba at one width and depth over token counts.
- Deployment: every trained variant's batch-1 latency, throughput, peak memory, parameters and checkpoint
  size on this machine, beside its accuracy under each condition of its task (the report's decision table).
- Serialisation (claim 1): the proximity-task models' accuracy per scan order, and how each order keeps
  grid neighbours together.

Outputs: `<out>/results.json` (everything: a `pipeline.evaluation.results.Results`), `<out>/figures/*.png`,
`<metrics>` (headline numbers for `dvc metrics`), and `<plots>/*.csv` (for `dvc plots`); the same numbers and
figures go to the study's MLflow parent run.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perception.data.arrays import open_dataset
from perception.evaluation.intervals import BootstrapSettings
from perception.machine import processor_name
from pipeline.config import StudyConfig
from pipeline.evaluation import evidence
from pipeline.evaluation.measurements import (
    DeploymentTiming,
    load_checkpoints,
    measure_images,
    measure_rotation,
    save_arrays,
    test_clouds,
    tested_points,
    with_unhelped_tables,
)
from pipeline.evaluation.results import FitRecord, Results, to_json
from pipeline.outputs import Laps, atomic_output_dir, read_json, write_json_atomic
from pipeline.parallel import shared_pool
from pipeline.reporting.tables import headline_metrics, plot_tables, write_csv
from pipeline.tracking import review
from pipeline.tracking.stage_logs import log_evaluation
from pipeline.tracking.store import check_reachable


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


# Latency windows at each of the stage's three pauses: a model's latency moves by several percent from one
# process to the next (8-12% between six fresh processes here, 4-6% between six windows of one process), so
# the interval needs several processes to see it.
WINDOWS_PER_PAUSE = 2


def _deployment_timing(config, checkpoints, points, images, proximity) -> DeploymentTiming:
    """Every trained variant ready to be timed on this machine (its GPU where there is one), on one test
    input of the size it trained on."""
    trained = evidence.trained_points(checkpoints, config.points.num_points)
    test_points = points.array("test_points")
    train_res, size = config.images.train_resolution, config.proximity.size
    samples = {
        "points": test_clouds(
            np.array(test_points[:1]), tested_points(trained, test_points.shape[1]), config.seed
        ),
        "images": torch.from_numpy(np.array(images.array(f"test_r{train_res}")[:1])),  # (1, C, H, W)
        "proximity": torch.from_numpy(np.array(proximity.array(f"test_r{size}")[:1])),
    }
    ev = config.evaluate
    return DeploymentTiming(
        checkpoints,
        samples,
        device=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
        block_ms=ev.deploy_block_ms,
        threads=ev.deploy_threads or torch.get_num_threads(),
        seed=ev.bootstrap_seed,
    )


def _machine() -> str:
    """The machine the latencies were measured on, as a reader would name it."""
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{platform.node()} ({processor_name()}, {os.cpu_count()} CPU cores{gpu})"


def evaluate(
    config: StudyConfig,
    points_dir: Path,
    images_dir: Path,
    proximity_dir: Path,
    train_dir: Path,
    out: Path,
    metrics_out: Path,
    plots_dir: Path,
    parts: dict[str, float] | None = None,
) -> Results:
    """Measure the four claims on the checkpoints in `train_dir`; `parts` gets each part's wall seconds
    (rotation, resolution, serialisation, bootstraps, cost sweep, outputs and MLflow), which it prints."""
    # torch's profiler, which measures the CPU peak memory of the cost sweep and the deployed models, prints
    # two lines at every use below kineto's log level 6 (about 80 in a study); the stage's lines say what
    # was measured. Set before the first use, and inherited by the processes the stage starts.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
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
    lap = Laps(parts)
    ev = config.evaluate
    settings = BootstrapSettings(ev.bootstrap_resamples, ev.bootstrap_seed)
    infos = evidence.variant_infos(checkpoints)
    num_classes = len(points.manifest["classes"])
    train_res = config.images.train_resolution

    # Latency is timed where this process has the machine to itself: now, after the parallel parts, and at
    # the end, WINDOWS_PER_PAUSE windows each, every window in a fresh process (DeploymentTiming says why).
    deployment_timing = _deployment_timing(config, checkpoints, points, images, proximity)
    deployment_timing.windows(WINDOWS_PER_PAUSE, ev.deploy_rounds)
    lap("deployment")

    workers = config.runtime.workers
    # The three parts share their worker processes: each would otherwise spawn its own and import torch again.
    with shared_pool(workers) as pool:
        rotation = measure_rotation(
            checkpoints,
            points.folder / "test_points.npy",
            points.folder / "test_labels.npy",
            draws=ev.rotation_draws,
            data_seed=config.seed,
            batch_size=ev.batch_size,
            invariance_clouds=ev.invariance_clouds,
            trained_points=evidence.trained_points(checkpoints, config.points.num_points),
            workers=workers,
            pool=pool,
        )
        lap("rotation")
        canvases = tuple(r for r in config.images.resolutions if r != train_res)
        canvas_names = evidence.canvas_set_names(canvases)
        # Each test set is read (and checked) here once; the workers that run the models map its file. The
        # images' manifest names every test canvas's file (`test_sets`); `in` is the training canvas's.
        canvas_stems = {"in": f"test_r{train_res}"}
        for name in canvas_names[1:]:
            kind, side = name.rsplit("_", 1)
            canvas_stems[name] = images.manifest["test_sets"][side][kind]
        canvas_sets = {name: images.array(stem) for name, stem in canvas_stems.items()}
        canvas_files = {name: images.folder / f"{stem}.npy" for name, stem in canvas_stems.items()}
        canvas = measure_images(
            checkpoints,
            canvas_files,
            images.folder / "test_labels.npy",
            dataset="images",
            batch_size=ev.batch_size,
            workers=workers,
            pool=pool,
        )
        lap("resolution")
        size = config.proximity.size
        prox = measure_images(
            checkpoints,
            {"in": proximity.folder / f"test_r{size}.npy"},
            proximity.folder / "test_labels.npy",
            dataset="proximity",
            batch_size=ev.batch_size,
            workers=workers,
            pool=pool,
        )
        lap("serialisation")
    deployment_timing.windows(WINDOWS_PER_PAUSE, ev.deploy_rounds)
    lap("deployment")

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
    locality = evidence.scan_locality(config.proximity.size // config.proximity.patch_size)
    task_grid = list(locality["rowmajor"])[0]
    for row in proximity_table.values():
        order = row["scan_order"]
        row["locality"] = locality[order][task_grid] if order else None
    claim_evidence: dict[str, Any] = {
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
    lap("bootstraps")
    cost = _cost(config, settings)
    claim_evidence["cost"] = evidence.cost_evidence(cost)
    lap("cost sweep")
    deployment_timing.windows(WINDOWS_PER_PAUSE, ev.deploy_rounds)
    deployment = deployment_timing.costs(
        batch_size=ev.batch_size,
        min_run_time=ev.deploy_min_run_time,
        resamples=ev.bootstrap_resamples,
        progress=lambda line: print(line, flush=True),
    )
    reference = deployment_timing.reference(ev.bootstrap_resamples)
    print(
        f"evaluate: deploy {'(machine reference)':26s} {reference.median:8.3f} ms [{reference.lo:.3f}, "
        f"{reference.hi:.3f}]: a fixed workload, to compare this machine's speed between runs",
        flush=True,
    )
    deployment_table = evidence.deployment_table(
        {variant: c.as_dict() for variant, c in deployment.items()},
        rotation.correct,
        canvas.correct,
        prox.correct,
        infos,
        canvases,
        settings,
        _machine(),
        (reference.median, reference.lo, reference.hi),
    )
    lap("deployment")

    results = Results(
        seed=config.seed,
        seeds=sorted({s for by_seed in checkpoints.values() for s in by_seed}),
        evaluate=ev.plain(),
        num_classes=num_classes,
        test_samples={
            "points": int(len(points.array("test_labels"))),
            "images": int(len(images.array("test_labels"))),
            "proximity": int(len(proximity.array("test_labels"))),
        },
        canvas={
            "train_resolution": train_res,
            "object_size": config.images.object_size,
            "canvases": list(canvases),
            "test_sets": canvas_names,
        },
        points_per_cloud=rotation.points_per_cloud,
        bootstrap={
            "method": settings.describe(),
            "resamples": settings.resamples,
            "seed": settings.seed,
            "level": settings.level,
        },
        models={name: FitRecord(**vars(fit), floor=fit.floor) for name, fit in fits.items()},
        rotation=rotation_table,
        resolution=resolution_table,
        serialisation={
            "orders": locality,
            "task_grid": task_grid,
            "task": config.proximity.plain(),
            "models": proximity_table,
        },
        cost=cost,
        deployment=deployment_table,
        evidence=claim_evidence,
        wall_seconds=round(time.monotonic() - began, 1),
        mlflow=study.get("mlflow", {}),
    )

    metrics = headline_metrics(results)
    plots = plot_tables(results)
    with atomic_output_dir(out) as folder:
        (folder / "results.json").write_text(to_json(results, sort_keys=True))
        save_arrays(folder / "per_sample.npz", rotation, canvas, prox)
        (folder / "figures").mkdir()
        from pipeline.reporting.figures import draw_figures

        figures = draw_figures(results, folder / "figures")
    with atomic_output_dir(plots_dir) as folder:
        for name, rows in plots.items():
            write_csv(folder / f"{name}.csv", rows)
    write_json_atomic(metrics_out, metrics)
    tables = [out / "results.json"] + [plots_dir / f"{name}.csv" for name in plots]
    if tracking.get("parent_run_id"):
        figure_paths = [out / "figures" / f.name for f in figures]
        per_model = evidence.per_model_test_metrics(
            checkpoints, [rotation.correct, canvas.correct, prox.correct], settings
        )
        # Under names every trial run shares, so MLflow's chart view compares them across the study.
        for variant, by_seed in per_model.items():
            for metrics in by_seed.values():
                metrics.update(evidence.deployment_metrics(deployment[variant]))
        # A derived reading (vit-learned_fixed) is tested on the shape canvases: its runs' input.
        in_file = Path(images_dir) / f"{canvas_stems['in']}.npy"
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
        log_evaluation(
            tracking,
            per_model,
            train_dir,
            results.cost.rows,
            tables,
            figure_paths,
            image_inputs,
            config.mlflow.wait_seconds,
        )
    else:
        print("evaluate: no MLflow parent run in the train outputs; skipping MLflow")
    lap("outputs and MLflow")
    split = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in lap.parts.items())
    elapsed = time.monotonic() - began
    print(f"evaluate: done in {elapsed:.0f} s ({split}) -> {out}, {metrics_out}, {plots_dir}")
    return results
