"""`python -m pipeline <stage>`: the entry point that dvc.yaml calls for every stage."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline.config import ConfigError, load_config
from pipeline.outputs import write_json_atomic

TIMINGS = Path("data/timings")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    points = stages.add_parser("prepare-points", help="make the point-cloud dataset (and its meshes)")
    points.add_argument("--params", type=Path, default=Path("params.yaml"))
    points.add_argument("--out", type=Path, default=Path("data/prepared/points"))

    images = stages.add_parser("prepare-images", help="render the point dataset's meshes as depth + normals")
    images.add_argument("--params", type=Path, default=Path("params.yaml"))
    images.add_argument("--points", type=Path, default=Path("data/prepared/points"))
    images.add_argument("--out", type=Path, default=Path("data/prepared/images"))

    train = stages.add_parser(
        "train", help="train every model variant in one Ray Tune run, tracked in MLflow"
    )
    train.add_argument("--params", type=Path, default=Path("params.yaml"))
    train.add_argument("--points", type=Path, default=Path("data/prepared/points"))
    train.add_argument("--images", type=Path, default=Path("data/prepared/images"))
    train.add_argument("--out", type=Path, default=Path("data/train"))
    train.add_argument("--metrics", type=Path, default=Path("metrics/train.json"))

    evaluate = stages.add_parser("evaluate", help="measure the four claims on the trained models")
    evaluate.add_argument("--params", type=Path, default=Path("params.yaml"))
    evaluate.add_argument("--points", type=Path, default=Path("data/prepared/points"))
    evaluate.add_argument("--images", type=Path, default=Path("data/prepared/images"))
    evaluate.add_argument("--train", type=Path, default=Path("data/train"))
    evaluate.add_argument("--out", type=Path, default=Path("data/evaluation"))
    evaluate.add_argument("--metrics", type=Path, default=Path("metrics/evaluate.json"))
    evaluate.add_argument("--plots", type=Path, default=Path("plots"))

    report = stages.add_parser("report", help="the verdict on each claim, as Markdown and HTML")
    report.add_argument("--params", type=Path, default=Path("params.yaml"))
    report.add_argument("--evaluation", type=Path, default=Path("data/evaluation"))
    report.add_argument("--train", type=Path, default=Path("data/train"))
    report.add_argument("--out", type=Path, default=Path("reports"))

    check = stages.add_parser("check-params", help="validate params.yaml and print the resolved config")
    check.add_argument("--params", type=Path, default=Path("params.yaml"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Imports are deferred so that a bad params file fails before heavy libraries load.
    from perception.data.arrays import DatasetError
    from perception.data.meshio import UnusableMesh
    from pipeline.stages.prepare_points import DataError
    from pipeline.stages.train import TrainingError

    began = time.monotonic()
    try:
        config = load_config(args.params)
        base_dir = args.params.resolve().parent
        if args.stage == "check-params":
            for key, value in config.flat().items():
                print(f"{key}: {value}")
        elif args.stage == "prepare-points":
            from pipeline.stages.prepare_points import prepare_points

            prepare_points(config, args.out, base_dir)
        elif args.stage == "prepare-images":
            from pipeline.stages.prepare_images import prepare_images

            prepare_images(config, args.points, args.out)
        elif args.stage == "train":
            from pipeline.stages.train import train

            train(config, args.points, args.images, args.out, args.metrics, base_dir)
        elif args.stage == "evaluate":
            from pipeline.stages.evaluate import evaluate

            evaluate(config, args.points, args.images, args.train, args.out, args.metrics, args.plots)
        elif args.stage == "report":
            from pipeline.stages.report import report

            report(args.evaluation, args.train, base_dir / TIMINGS, args.out)
    except (ConfigError, DatasetError, DataError, UnusableMesh, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.stage != "check-params":
        # Each stage's wall time, for the report (not a DVC output: it differs on every run).
        write_json_atomic(
            base_dir / TIMINGS / f"{args.stage}.json", {"wall_seconds": time.monotonic() - began}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
