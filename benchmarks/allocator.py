"""A trial's epoch under glibc's default malloc settings and under the trials' (`perception.allocator`), one
family after another, in one run:

    python -m benchmarks.allocator --json allocator.json    # about 7 minutes on 2 cores
    python -m benchmarks.allocator pointnet-none dgcnn --repeats 3

Each measurement is a fresh spawned process (malloc's state is the process's, and cannot be set back), which
trains one untimed epoch and then `--epochs` timed ones, training and validation, in a thread of its own on
one thread, as a Ray Tune trial does (`benchmarks.slots`); default and kept alternate `--repeats` times on the
same data, model and seed. Reported per variant: the median epoch each way and their ratio, and the largest
peak resident memory each way, the cost of keeping freed blocks.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.screen import prepared_folder, trial_inputs
from benchmarks.slots import add_study_arguments, chosen_variants, timed_epochs

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.allocator", description=__doc__.splitlines()[0]
    )
    add_study_arguments(parser)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per process (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="processes each way (default 2)")
    args = parser.parse_args(argv)
    for name, value in (("--epochs", args.epochs), ("--repeats", args.repeats)):
        if value < 1:
            raise SystemExit(f"allocator: {name} {value}; expected 1 or more")
    config, variants = chosen_variants("allocator", args.params, args.variants)
    context = multiprocessing.get_context("spawn")
    rows = []
    with tempfile.TemporaryDirectory(prefix="allocator-") as tmp:
        for variant in variants:
            name = variant.name
            folder = prepared_folder(
                config, variant.dataset, args.data or Path(tmp), args.params.resolve().parent
            )
            flat, data, _ = trial_inputs(config, variant, 0, folder)
            seconds: dict[str, list[float]] = {"default": [], "kept": []}
            peak_mib: dict[str, list[float]] = {"default": [], "kept": []}
            for _ in range(args.repeats):
                for way in ("default", "kept"):
                    with ProcessPoolExecutor(1, mp_context=context, max_tasks_per_child=1) as fresh:
                        item = (flat, data, 1, args.epochs, way == "kept")
                        epochs, peak = fresh.submit(timed_epochs, item).result()
                    seconds[way] += epochs
                    peak_mib[way].append(peak)
            row: dict[str, Any] = {
                "variant": name,
                "default_s": round(statistics.median(seconds["default"]), 3),
                "kept_s": round(statistics.median(seconds["kept"]), 3),
                "default_peak_mib": round(max(peak_mib["default"]), 1),
                "kept_peak_mib": round(max(peak_mib["kept"]), 1),
            }
            row["speedup"] = round(row["default_s"] / row["kept_s"], 3)
            row["memory_ratio"] = round(row["kept_peak_mib"] / row["default_peak_mib"], 3)
            rows.append(row)
            print(
                f"allocator: {name:26s} default {row['default_s']:6.2f} s  kept {row['kept_s']:6.2f} s  "
                f"x{row['speedup']:.2f} | peak memory {row['default_peak_mib']:7.1f} -> "
                f"{row['kept_peak_mib']:7.1f} MiB (x{row['memory_ratio']:.2f})",
                flush=True,
            )
    if args.json:
        report = {"epochs": args.epochs, "repeats": args.repeats, "variants": rows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
