"""How a machine's cores are best spent on trials: one epoch of each family timed three ways, in one run.

    python -m benchmarks.slots --json slots.json            # about 6 minutes on 2 cores
    python -m benchmarks.slots e3nn dgcnn --epochs 3        # some variants, more timed epochs

- alone: one trial on one thread, the machine otherwise idle;
- side by side: `--slots` trials at once (default: one per core), one thread each, as the train stage runs
  them (`train.cpus_per_trial: 1`);
- threaded: one trial on `--slots` threads (`train.cpus_per_trial` = the cores, one trial at a time).

Each way's throughput is epochs per second over the machine, as a ratio to one trial alone: side by side
gives slots x alone / its epoch time, threaded alone / its epoch time. Cores that shared nothing would make
side by side `--slots`; on a VM whose cores share the cache and memory, trials slow each other down, and
this says by how much, per family. An epoch is a trial's: training, then validation, in a thread of its own
and under the trials' allocator settings (`perception.allocator`), from a model built and warmed up by one
epoch before the timing starts, on the default params' data (prepared into `--data`, or a
temporary folder), at training seed 0. The trials run in spawned worker processes started once for the run,
one for alone and threaded, `--slots` for side by side, which start timing together (a barrier).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import perception.training as training
from benchmarks.epoch import VARIANTS
from benchmarks.screen import prepared_folder, trial_inputs
from perception.allocator import keep_freed_blocks
from pipeline.config import ConfigError, StudyConfig, load_config
from pipeline.parallel import worker_count
from pipeline.training import space
from pipeline.training.trainable import TrialData, build_model, step_settings, trial_optimizer

REPO = Path(__file__).resolve().parents[1]
WAYS = ("alone", "side_by_side", "threaded")


@dataclass(frozen=True)
class SlotTimes:
    """One variant's median epoch seconds each way, and each way's throughput as a ratio to alone."""

    variant: str
    slots: int
    alone_s: float
    side_by_side_s: float  # the median over every trial's epochs
    threaded_s: float

    @property
    def side_by_side_throughput(self) -> float:
        return self.slots * self.alone_s / self.side_by_side_s

    @property
    def threaded_throughput(self) -> float:
        return self.alone_s / self.threaded_s

    @property
    def best(self) -> str:
        """The way that trains the most epochs per second over the machine."""
        ways = {"alone": 1.0, "side_by_side": self.side_by_side_throughput}
        ways["threaded"] = self.threaded_throughput
        return max(ways, key=lambda way: ways[way])

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "side_by_side_throughput": round(self.side_by_side_throughput, 3),
            "threaded_throughput": round(self.threaded_throughput, 3),
            "best": self.best,
        }


_BARRIER: Any = None  # in a worker: the barrier of its pool, so that its trials start timing together


def _set_barrier(barrier: Any) -> None:
    global _BARRIER
    _BARRIER = barrier


def timed_epochs(item: tuple[dict[str, Any], TrialData, int, int, bool]) -> tuple[list[float], float]:
    """A trial's epochs (training, then validation), timed after one untimed epoch, in a thread of its own as
    a Ray Tune trial trains; with `keep_freed`, under the trials' allocator settings (perception.allocator).
    In a worker process; returns the epoch seconds and the process's peak resident memory in MiB."""
    flat, data, threads, epochs, keep_freed = item
    if keep_freed:
        keep_freed_blocks()
    with ThreadPoolExecutor(1) as trial_thread:
        seconds = trial_thread.submit(_epochs, flat, data, threads, epochs).result()
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _epochs(flat: dict[str, Any], data: TrialData, threads: int, epochs: int) -> list[float]:
    torch.set_num_threads(threads)
    torch.manual_seed(int(flat["trial.seed"]))
    model = build_model(flat)
    step = step_settings(flat)
    optimizer = trial_optimizer(model, flat)
    train_x, train_y = torch.from_numpy(data.train_inputs), torch.from_numpy(data.train_labels)
    val_x, val_y = torch.from_numpy(data.val_inputs), torch.from_numpy(data.val_labels)
    generator = torch.Generator().manual_seed(int(flat["trial.seed"]))
    cpu = torch.device("cpu")

    def epoch() -> float:
        began = time.perf_counter()
        training.train_one_epoch(model, optimizer, train_x, train_y, step, generator, cpu)
        training.correct(model, val_x, val_y, step.batch_size, cpu)
        return time.perf_counter() - began

    epoch()  # first-call allocations, lazy imports and kernel loading stay out of the timing
    if _BARRIER is not None:
        _BARRIER.wait()
    return [epoch() for _ in range(epochs)]


def time_variant(
    flat: dict[str, Any], data: TrialData, slots: int, epochs: int, pools: dict[str, ProcessPoolExecutor]
) -> SlotTimes:
    """One variant's epochs each way, on the pools' fresh processes (`pools`: "one" and "all")."""
    alone, _ = pools["one"].submit(timed_epochs, (flat, data, 1, epochs, True)).result()
    beside = [pools["all"].submit(timed_epochs, (flat, data, 1, epochs, True)) for _ in range(slots)]
    side_by_side = [seconds for future in beside for seconds in future.result()[0]]
    threaded, _ = pools["one"].submit(timed_epochs, (flat, data, slots, epochs, True)).result()
    return SlotTimes(
        variant=str(flat["trial.name"]),
        slots=slots,
        alone_s=round(statistics.median(alone), 3),
        side_by_side_s=round(statistics.median(side_by_side), 3),
        threaded_s=round(statistics.median(threaded), 3),
    )


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """The variants to time, the params they come from, where their data are prepared, and the report."""
    default = " ".join(VARIANTS)
    parser.add_argument("variants", nargs="*", help=f"variants of train.models (default: {default})")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--data", type=Path, help="a folder to prepare the datasets in once, and reuse")
    parser.add_argument("--json", type=Path, help="write the table here")


def chosen_variants(prog: str, params: Path, names: list[str]) -> tuple[StudyConfig, list[space.Variant]]:
    """The study's params and the variants `names` (default: `VARIANTS`, one per family), or one line naming
    what is wrong and what is allowed (a `SystemExit`), before any work."""
    try:
        config = load_config(params)
    except ConfigError as err:
        raise SystemExit(f"{prog}: {err}") from None
    variants = {v.name: v for v in space.expand(config)}
    names = names or [name for name in VARIANTS if name in variants]
    unknown = [name for name in names if name not in variants]
    if unknown:
        expected = ", ".join(variants)
        raise SystemExit(f"{prog}: {', '.join(unknown)} not in train.models; expected some of {expected}")
    return config, [variants[name] for name in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.slots", description=__doc__.splitlines()[0])
    add_study_arguments(parser)
    parser.add_argument("--slots", type=int, default=0, help="trials side by side (default: one per core)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per trial (default 2)")
    args = parser.parse_args(argv)
    slots = worker_count(args.slots)
    if args.slots < 0 or slots < 2:
        raise SystemExit(f"slots: --slots {args.slots} gives {slots}; expected 2 or more (0: one per core)")
    if args.epochs < 1:
        raise SystemExit(f"slots: --epochs {args.epochs}; expected 1 or more")
    config, variants = chosen_variants("slots", args.params, args.variants)
    rows: list[SlotTimes] = []
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="slots-") as tmp:
        data_root = args.data or Path(tmp)
        pools = {
            "one": ProcessPoolExecutor(
                1, mp_context=context, initializer=_set_barrier, initargs=(context.Barrier(1),)
            ),
            "all": ProcessPoolExecutor(
                slots, mp_context=context, initializer=_set_barrier, initargs=(context.Barrier(slots),)
            ),
        }
        try:
            for variant in variants:
                name = variant.name
                folder = prepared_folder(config, variant.dataset, data_root, args.params.resolve().parent)
                flat, data, _ = trial_inputs(config, variant, 0, folder)
                row = time_variant(flat, data, slots, args.epochs, pools)
                rows.append(row)
                print(
                    f"slots: {name:26s} alone {row.alone_s:6.2f} s | {slots} side by side "
                    f"{row.side_by_side_s:6.2f} s, x{row.side_by_side_throughput:.2f} | one on {slots} "
                    f"threads {row.threaded_s:6.2f} s, x{row.threaded_throughput:.2f} | best: {row.best}",
                    flush=True,
                )
        finally:
            for pool in pools.values():
                pool.shutdown(cancel_futures=True)
    if args.json:
        report = {"slots": slots, "epochs": args.epochs, "variants": [row.as_dict() for row in rows]}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
