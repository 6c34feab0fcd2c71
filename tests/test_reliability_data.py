"""Reliability of the data stages: a stage killed mid-write or just after, and two studies with one seed.

A data stage computes its arrays, then writes them into `.<name>.tmp-<pid>` beside its output and renames
the folder when whole (pipeline/outputs.py). A SIGKILL while that folder fills must leave no output under
the real name, the next stage must refuse to start, and `dvc repro` must produce the same bytes as a run
that was never interrupted. A SIGKILL after the rename, before DVC has recorded the stage, must make DVC
run the stage again (or check out what it cached), never take an unrecorded output as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import comparable_metrics, make_study_repo, run_command, tool_env

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class KilledStage:
    """A data stage to kill mid-write, with params that make its write take a visible fraction of a second
    (tens of MB) so that the kill reliably lands while the temporary folder fills; ~2 s of work each."""

    params: dict
    output: str
    next_command: list[str]  # the next stage's real command, as dvc.yaml runs it
    next_outputs: list[str]  # what that command writes when it runs


# One worker: spawning processes would cost more than the work they share.
KILLED_STAGES = {
    "prepare_points": KilledStage(
        {"points": {"train_per_class": 10, "test_per_class": 3, "num_points": 100_000},
         "runtime": {"workers": 1}},
        "data/prepared/points",
        ["python", "-m", "pipeline", "prepare-images", "--params", "params.yaml",
         "--points", "data/prepared/points", "--out", "data/prepared/images"],
        ["data/prepared/images", "data/timings/prepare-images.json"],
    ),  # 62 MB of points
    "prepare_images": KilledStage(
        {"points": {"train_per_class": 5, "test_per_class": 5}, "runtime": {"workers": 1},
         "images": {"train_resolution": 256, "eval_resolutions": [256]}},
        "data/prepared/images",
        ["python", "-m", "pipeline", "train", "--params", "params.yaml", "--points", "data/prepared/points",
         "--images", "data/prepared/images", "--out", "data/train", "--metrics", "metrics/train.json"],
        ["data/train", "metrics/train.json", "data/timings/train.json"],
    ),  # 42 MB of renders
}  # fmt: skip
DATA_STAGES = ("prepare_points", "prepare_images")


def _file_hashes(root: Path, folders: tuple[str, ...]) -> dict[str, str]:
    """Relative path -> sha256 of every file under the folders."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in folders
        for path in sorted((root / folder).rglob("*"))
        if path.is_file()
    }


def _locked_md5(root: Path) -> dict[str, str]:
    """Output path -> md5 that dvc.lock records, for the data stages."""
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for name in DATA_STAGES if name in stages for o in stages[name]["outs"]}


def _temporaries(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f".{output.name}.tmp-*"))


def _holds_a_file(output: Path) -> bool:
    for folder in _temporaries(output):
        try:
            if any(folder.iterdir()):
                return True
        except FileNotFoundError:  # renamed into place between the glob and the listing
            pass
    return False


def _snapshot(root: Path) -> dict[str, int]:
    """Every file of the work tree (not .git, .dvc or bytecode) -> its mtime in ns."""
    return {
        str(path.relative_to(root)): path.stat().st_mtime_ns
        for path in root.rglob("*")
        if path.is_file() and not {".git", ".dvc", "__pycache__"} & set(path.relative_to(root).parts)
    }


def _kill_when(
    spawn: Callable[..., subprocess.Popen],
    command: list[str],
    root: Path,
    log: Path,
    ready: Callable[[], bool],
    what: str,
) -> int:
    """Start `command` in its own process group (`spawn`), SIGKILL the whole group once `ready()`; returns its
    pid. Should `ready` or a wait fail, `spawn` kills the group when the test ends."""
    with open(log, "w") as out:
        process = spawn(command, cwd=root, env=tool_env(), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while not ready():
        if process.poll() is not None:
            raise AssertionError(f"{' '.join(command)} ended before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within 600 s:\n{log.read_text()}")
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGKILL)  # the group: dvc, the stage and any worker processes
    process.wait(timeout=60)
    for _ in range(1000):  # orphaned children die a moment later; none may write after this point
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.01)
    else:
        raise AssertionError(f"process group {process.pid} still alive after SIGKILL")
    return process.pid


@pytest.mark.parametrize("stage", list(KILLED_STAGES))
def test_a_data_stage_killed_mid_write_leaves_nothing_usable_and_reruns_to_the_same_bytes(
    stage: str, tmp_path: Path, spawn
):
    case = KILLED_STAGES[stage]
    reference = make_study_repo(tmp_path / "uninterrupted", case.params)
    run_command(["dvc", "repro", stage], reference)
    root = make_study_repo(tmp_path / "killed", case.params)
    if stage != DATA_STAGES[0]:
        run_command(["dvc", "repro", DATA_STAGES[0]], root)
    output = root / case.output

    killed_pid = _kill_when(
        spawn,
        ["dvc", "repro", stage],
        root,
        tmp_path / "killed.log",
        lambda: _holds_a_file(output),
        f"{stage} wrote a file into its temporary folder",
    )
    assert _temporaries(output), "the kill landed after the rename: the write window is too short"
    assert not output.exists()

    # SIGKILL leaves DVC's lock files behind: the dead dvc still holds the write lock on the output.
    rwlock = json.loads((root / ".dvc/tmp/rwlock").read_text())
    assert rwlock["write"].get(str(output), {}).get("pid") == killed_pid, rwlock
    assert (root / ".dvc/tmp/lock").exists()

    # The next stage refuses, in one line naming the missing file, and writes nothing.
    before = _snapshot(root)
    refused = run_command(case.next_command, root, check=False)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert f"{case.output}/manifest.json: missing" in line, line
    assert _snapshot(root) == before
    assert not any((root / path).exists() for path in case.next_outputs)

    # Neither `dvc status` nor the rerun is blocked: DVC drops the dead pid's lock, saying so.
    status = run_command(["dvc", "status", stage], root)
    assert f"{stage}:" in status.stdout and "changed" in status.stdout, status.stdout
    rerun = run_command(["dvc", "repro", stage], root)
    assert f"Running stage '{stage}'" in rerun.stdout
    said = status.stdout + status.stderr + rerun.stdout + rerun.stderr
    assert f"(Pid {killed_pid})" in said and "had been killed" in said, said
    rwlock = json.loads((root / ".dvc/tmp/rwlock").read_text())
    assert killed_pid not in {info["pid"] for info in rwlock.get("write", {}).values()}, rwlock

    assert _temporaries(output) == []
    prepared = ("data/prepared",)  # every file in it: a stale temporary folder would show up here too
    assert _file_hashes(root, prepared) == _file_hashes(reference, prepared)
    locked = _locked_md5(reference)
    assert case.output in locked and _locked_md5(root) == locked


def _has_file(folder: Path) -> bool:
    return folder.is_dir() and any(path.is_file() for path in folder.rglob("*"))


# Points after the stage's rename, in order, with the ways `dvc repro` may then proceed. DVC writes its
# run-cache entry, then the output's cache objects (each to a temporary name, renamed), then dvc.lock; a
# run-cache entry whose objects are not all in the cache is ignored, so the stage runs again.
RUNS = "Running stage 'prepare_points'"
CHECKS_OUT = "Stage 'prepare_points' is cached - skipping run, checking out outputs"
AFTER_RENAME: dict[str, tuple[Callable[[Path], bool], tuple[str, ...]]] = {
    "output renamed into place": (
        lambda root: (root / "data/prepared/points/manifest.json").exists(),
        (RUNS,),
    ),
    "run-cache entry written": (lambda root: _has_file(root / ".dvc/cache/runs"), (RUNS,)),
    "cache objects being written": (lambda root: _has_file(root / ".dvc/cache/files"), (RUNS, CHECKS_OUT)),
}


@pytest.mark.parametrize("moment", list(AFTER_RENAME))
def test_a_kill_after_the_rename_but_before_dvc_records_the_stage_is_rerun(
    moment: str, tmp_path: Path, spawn
):
    from perception.data.arrays import open_dataset

    reached, outcomes = AFTER_RENAME[moment]
    root = make_study_repo(tmp_path, KILLED_STAGES["prepare_points"].params)
    output = root / "data/prepared/points"
    command = ["dvc", "repro", "prepare_points"]
    _kill_when(spawn, command, root, tmp_path / "killed.log", lambda: reached(root), moment)
    assert not (root / "dvc.lock").exists(), "the kill landed after DVC recorded the stage"
    open_dataset(output, "points")  # whole, since the rename is atomic: the next stage may read it
    written = _file_hashes(root, ("data/prepared/points",))

    status = run_command(["dvc", "status", "prepare_points"], root).stdout
    assert "prepare_points:" in status and "changed" in status, status
    rerun = run_command(["dvc", "repro", "prepare_points"], root).stdout
    assert any(outcome in rerun for outcome in outcomes), rerun
    assert _file_hashes(root, ("data/prepared/points",)) == written
    assert "up to date" in run_command(["dvc", "status", "prepare_points"], root).stdout


# --- determinism: a second study with the same seeds ------------------------------------------------------


def test_two_studies_with_the_same_seeds_produce_identical_data_and_metrics(
    smoke_study: Path, tmp_path: Path
):
    second = make_study_repo(tmp_path)
    assert second != smoke_study
    run_command(["dvc", "repro"], second)

    data = ("data/prepared",)
    assert _file_hashes(second, data) == _file_hashes(smoke_study, data)
    assert len(_file_hashes(second, data)) > 10
    locked = _locked_md5(smoke_study)
    assert set(locked) == {"data/prepared/points", "data/prepared/images"}
    assert _locked_md5(second) == locked
    metrics = comparable_metrics(smoke_study)
    assert comparable_metrics(second) == metrics
    kept_cost = metrics["evaluate"]["cost"]
    # What is left of the cost sweep is counted or deterministic: memory and FLOPs exponents.
    assert all(key.startswith(("memory", "flops")) for fits in kept_cost.values() for key in fits)
    assert all(fits for fits in kept_cost.values())
    # The verdicts of the claims on trained models repeat exactly (claim 3's rests on timings).
    verdicts = json.loads((smoke_study / "reports/verdicts.json").read_text())["claims"]
    again = json.loads((second / "reports/verdicts.json").read_text())["claims"]
    assert len(verdicts) == 4
    assert [v for v in again if v["claim"] != 3] == [v for v in verdicts if v["claim"] != 3]
