"""benchmarks.slots: one epoch of a variant alone, side by side with others and on several threads; the
throughput ratios it reports; and the input it and benchmarks.allocator refuse."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.slots import WAYS, SlotTimes
from tests.conftest import REPO


def test_throughput_is_epochs_per_second_over_the_machine_as_a_ratio_to_one_trial_alone():
    # Two trials side by side at 2.5 s an epoch train 2 / 2.5 epochs a second, against 1 / 2.0 alone.
    shared = SlotTimes("e3nn", slots=2, alone_s=2.0, side_by_side_s=2.5, threaded_s=1.6)
    assert shared.side_by_side_throughput == pytest.approx(1.6)
    assert shared.threaded_throughput == pytest.approx(1.25)
    assert shared.best == "side_by_side"
    # Trials that slow each other down more than threads speed one up: one trial at a time wins.
    crowded = SlotTimes("pointnet-none", slots=2, alone_s=1.0, side_by_side_s=2.2, threaded_s=0.6)
    assert crowded.best == "threaded"
    # Neither helps: a second trial halves each one's speed and threads add nothing.
    neither = SlotTimes("vit-none", slots=4, alone_s=1.0, side_by_side_s=4.4, threaded_s=1.1)
    assert neither.best == "alone"


def test_it_times_each_way_and_writes_the_ratios_of_those_times(params, tmp_path):
    out = tmp_path / "slots.json"
    command = [sys.executable, "-m", "benchmarks.slots", "pointnet-none", "--params", str(params)]
    command += ["--slots", "2", "--epochs", "2", "--data", str(tmp_path / "data"), "--json", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert (report["slots"], report["epochs"]) == (2, 2)
    (row,) = report["variants"]
    assert row["variant"] == "pointnet-none"
    assert all(row[f"{way}_s"] > 0 for way in WAYS)
    side_by_side = 2 * row["alone_s"] / row["side_by_side_s"]
    assert row["side_by_side_throughput"] == pytest.approx(side_by_side, abs=1e-3)
    assert row["threaded_throughput"] == pytest.approx(row["alone_s"] / row["threaded_s"], abs=1e-3)
    assert row["best"] in WAYS
    assert (tmp_path / "data" / "points" / "manifest.json").is_file()  # prepared once into --data
    line = next(line for line in done.stdout.splitlines() if "pointnet-none" in line)
    assert f"x{row['side_by_side_throughput']:.2f}" in line and f"best: {row['best']}" in line


@pytest.mark.parametrize(
    ("benchmark", "arguments", "named"),
    [
        ("slots", ["no-such-variant"], "no-such-variant not in train.models"),
        ("slots", ["--slots", "1"], "--slots 1"),
        ("slots", ["--epochs", "0"], "--epochs 0"),
        ("allocator", ["no-such-variant"], "no-such-variant not in train.models"),
        ("allocator", ["--repeats", "0"], "--repeats 0"),
    ],
)
def test_bad_input_gets_one_line_before_any_work(params, tmp_path, benchmark, arguments, named):
    command = [sys.executable, "-m", f"benchmarks.{benchmark}", *arguments, "--params", str(params)]
    command += ["--data", str(tmp_path / "data")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{benchmark}: ") and named in lines[0], done.stderr
    assert not (tmp_path / "data").exists()  # nothing prepared
