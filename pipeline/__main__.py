"""`python -m pipeline <stage>`: the entry point that dvc.yaml calls for every stage."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipeline.config import ConfigError, load_config
from pipeline.outputs import write_json_atomic

TIMINGS = Path("data/timings")


# stage -> (help, {path option: default}); every stage also takes --params.
STAGES: dict[str, tuple[str, dict[str, str]]] = {
    "prepare-points": ("make the point-cloud dataset (and its meshes)", {"out": "data/prepared/points"}),
    "prepare-images": (
        "render the point dataset's meshes as depth + normals",
        {"points": "data/prepared/points", "out": "data/prepared/images"},
    ),
    "prepare-proximity": (
        "draw claim 1's proximity task (the label depends on 2D adjacency alone)",
        {"out": "data/prepared/proximity"},
    ),
    "train": (
        "train every model variant in one Ray Tune run, tracked in MLflow",
        {
            "points": "data/prepared/points",
            "images": "data/prepared/images",
            "proximity": "data/prepared/proximity",
            "out": "data/train",
            "metrics": "metrics/train.json",
        },
    ),
    "evaluate": (
        "measure the four claims on the trained models",
        {
            "points": "data/prepared/points",
            "images": "data/prepared/images",
            "proximity": "data/prepared/proximity",
            "train": "data/train",
            "out": "data/evaluation",
            "metrics": "metrics/evaluate.json",
            "plots": "plots",
        },
    ),
    "report": (
        "the verdict on each claim, as Markdown and HTML",
        {"evaluation": "data/evaluation", "train": "data/train", "out": "reports"},
    ),
    "check-params": ("validate params.yaml, its model variants included, and print the resolved config", {}),
    "schema": ("write the JSON Schema of params.yaml (for editors)", {"out": "params.schema.json"}),
    "profiles": (
        "rewrite the benchmark profiles from params.yaml, keeping their points sections",
        {"folder": "profiles"},
    ),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (help, paths) in STAGES.items():
        stage = stages.add_parser(name, help=help)
        stage.add_argument("--params", type=Path, default=Path("params.yaml"))
        for option, default in paths.items():
            stage.add_argument(f"--{option}", type=Path, default=Path(default))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Imports are deferred so that a bad params file fails before heavy libraries load.
    from perception.data.arrays import DatasetError
    from perception.data.meshio import UnusableFile
    from pipeline.errors import DataError, TrainingError
    from pipeline.tracking.store import TrackingUnavailable

    began = time.monotonic()
    timing: dict = {}  # what the stage's timings file holds besides its wall time (evaluate: its parts)
    if args.stage == "schema":
        from pipeline.config import params_schema

        args.out.write_text(json.dumps(params_schema(), indent=2) + "\n")
        print(f"wrote {args.out}")
        return 0
    if args.stage == "profiles":
        from pipeline.config import PROFILES, synced_profile

        params = args.params.read_text()
        for name in PROFILES:
            path = args.folder / f"{name}.yaml"
            path.write_text(synced_profile(path.read_text(), params))
            print(f"wrote {path}")
        return 0
    try:
        config = load_config(args.params)
        base_dir = args.params.resolve().parent
        if args.stage == "check-params":
            from pipeline.stages.train import check_variants

            variants = check_variants(config)  # before anything is printed: a bad entry gets one line
            for key, value in config.flat().items():
                print(f"{key}: {value}")
            print("\n".join(variants))
        elif args.stage == "prepare-points":
            from pipeline.stages.prepare_points import prepare_points

            prepare_points(config, args.out, base_dir)
        elif args.stage == "prepare-images":
            from pipeline.stages.prepare_images import prepare_images

            prepare_images(config, args.points, args.out)
        elif args.stage == "prepare-proximity":
            from pipeline.stages.prepare_proximity import prepare_proximity

            prepare_proximity(config, args.out)
        elif args.stage == "train":
            from pipeline.stages.train import train

            train(config, args.points, args.images, args.proximity, args.out, args.metrics, base_dir)
        elif args.stage == "evaluate":
            from pipeline.stages.evaluate import evaluate

            timing["parts"] = {}
            evaluate(
                config,
                args.points,
                args.images,
                args.proximity,
                args.train,
                args.out,
                args.metrics,
                args.plots,
                timing["parts"],
            )
        elif args.stage == "report":
            from pipeline.stages.report import report

            report(
                args.evaluation,
                args.train,
                base_dir / TIMINGS,
                args.out,
                config.mlflow.wait_seconds,
                config.report.latency_budget_ms,
            )
    except (ConfigError, DatasetError, DataError, UnusableFile, TrainingError, TrackingUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.stage != "check-params":
        # Each stage's wall time, for the report (not a DVC output: it differs on every run).
        write_json_atomic(
            base_dir / TIMINGS / f"{args.stage}.json", {"wall_seconds": time.monotonic() - began, **timing}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
