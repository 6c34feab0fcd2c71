"""Studies side by side (a DVC queue with -j N): where their records go, the locks and CPU slots they share.

Unit tests of our own logic; `test_dvc_queue.py` runs the real queue."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from pipeline.config import home_repo, parse_config
from pipeline.parallel import cpu_slots, in_use, locked, parallel_map, shared_pool
from pipeline.tracking.store import artifact_root, tracking_uri
from pipeline.training import session
from tests import processes
from tests.conftest import TINY_PARAMS, merge, wait_for


def test_a_queued_experiments_home_is_the_repository_dvc_runs_in(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    clone = repo / ".dvc/tmp/exps/tmpab12cd"  # dvc exp run --queue
    temp = repo / ".dvc/tmp/exps/standalone/tmpef34"  # dvc exp run --temp
    for folder in (clone, temp):
        folder.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    assert home_repo(clone) == repo.resolve() and home_repo(temp) == repo.resolve()
    assert home_repo(repo) == repo  # dvc repro, a plain dvc exp run
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    assert home_repo(elsewhere) == elsewhere  # a DVC_ROOT that is not this clone's origin changes nothing
    monkeypatch.delenv("DVC_ROOT")
    assert home_repo(clone) == clone  # run by hand, with no DVC around


def test_records_and_trial_storage_outlive_the_temporary_clone(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    clone = repo / ".dvc/tmp/exps/tmpab12cd"
    clone.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri("", clone) == f"sqlite:///{repo.resolve() / 'mlflow.db'}"
    assert artifact_root(tracking_uri("", clone), clone) == (repo.resolve() / "mlartifacts").as_uri()
    assert artifact_root("http://127.0.0.1:5000", clone) is None  # a server keeps its own artifacts
    config = parse_config(merge(TINY_PARAMS, {}), clone)
    assert session.storage_path(config, clone) == str(repo.resolve() / "data/ray_results")
    relative = parse_config(merge(TINY_PARAMS, {"ray": {"storage": "runs/tune"}}), clone)
    assert session.storage_path(relative, clone) == str(repo.resolve() / "runs/tune")
    remote = parse_config(merge(TINY_PARAMS, {"ray": {"storage": "s3://bucket/tune"}}), clone)
    assert session.storage_path(remote, clone) == "s3://bucket/tune"
    # What the user asks for still wins.
    assert tracking_uri("http://127.0.0.1:5000", clone) == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert tracking_uri("", clone) == "http://127.0.0.1:5001"


def _spawn(target, *args) -> multiprocessing.Process:
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    return process


def test_a_lock_is_seen_while_held_and_freed_when_its_holder_is_killed(tmp_path):
    path = tmp_path / "train-abc.lock"
    holder = _spawn(processes.hold, str(path), 60)
    wait_for(lambda: in_use(path), 30, poll=0.05)
    waits = []
    holder.kill()  # SIGKILL: no cleanup ran, the kernel releases the lock
    holder.join()
    with locked(path, waiting=lambda: waits.append(1)):
        assert not waits  # free at once
    assert not in_use(path) and not in_use(tmp_path / "never-made.lock")


def test_a_second_driver_of_the_same_trials_waits_and_says_so(tmp_path, capsys):
    experiment = str(tmp_path / "train-abc")
    holder = _spawn(processes.hold, str(session.lock_path(experiment)), 1.5)
    wait_for(lambda: in_use(session.lock_path(experiment)), 30, poll=0.05)
    began = time.monotonic()
    with session.holding(experiment):
        waited = time.monotonic() - began
    holder.join()
    assert waited > 0.5
    assert "another study is training the same trials" in capsys.readouterr().out


def test_clearing_old_runs_keeps_the_restored_one_and_those_in_use(tmp_path):
    storage = tmp_path / "ray_results"
    for name in ("train-old", "train-busy", "train-mine"):
        (storage / name).mkdir(parents=True)
    holder = _spawn(processes.hold, str(session.lock_path(str(storage / "train-busy"))), 60)
    try:
        wait_for(lambda: in_use(session.lock_path(str(storage / "train-busy"))), 30, poll=0.05)
        session.clear_local_runs(str(storage), keep="train-mine")
    finally:
        holder.kill()
        holder.join()
    assert sorted(p.name for p in storage.iterdir() if p.is_dir()) == ["train-busy", "train-mine"]


def test_cpu_slots_let_no_more_trials_run_at_once_than_the_machine_has_cores(tmp_path):
    cores = os.cpu_count() or 1
    log = tmp_path / "intervals.txt"
    # Two studies' worth of trials, each asking for a core, on a machine of `cores` cores.
    trials = [_spawn(processes.trial, str(tmp_path / "slots"), str(log), 0.4) for _ in range(2 * cores + 1)]
    for trial in trials:
        trial.join()
    intervals = [tuple(map(float, line.split())) for line in log.read_text().splitlines()]
    assert len(intervals) == 2 * cores + 1
    most = max(sum(a <= t < b for a, b in intervals) for t, _ in intervals)
    assert most == cores


def test_a_waiting_trial_is_not_starved_by_trials_that_follow_one_another(tmp_path):
    """Every core goes to a process that frees it and asks again at once (reused Ray workers); a trial of
    another study that asks meanwhile gets a core while they still run, not after them."""
    cores = os.cpu_count() or 1
    hogs = [_spawn(processes.hog, str(tmp_path), 8.0) for _ in range(cores)]
    time.sleep(1.0)  # every core taken, freed and taken again by now
    began = time.monotonic()
    log = tmp_path / "served"
    waiter = _spawn(processes.wait_for_core, str(tmp_path), str(log))
    waiter.join(30)
    served = float(log.read_text())
    for hog in hogs:
        hog.join()
    assert served - began < 5.0, served - began  # the hogs ran for 7 s more: first come, first served


def test_a_holder_waiting_for_all_cores_holds_none_of_them(tmp_path):
    cores = os.cpu_count() or 1
    if cores < 2:
        pytest.skip("needs two cores")
    log = tmp_path / "log"
    with cpu_slots(1, tmp_path, poll_s=0.01):
        wanting_all = _spawn(processes.take, str(tmp_path), cores, str(log))
        wait_for(lambda: Path(str(log) + ".asking").exists(), 30, poll=0.05)
        time.sleep(0.5)
        assert not log.exists()  # it waits for the core held here...
        with cpu_slots(cores - 1, tmp_path, poll_s=0.01) as waited:
            assert waited < 5  # ...holding none of the others meanwhile
    wanting_all.join(30)
    assert float(log.read_text()) > 0.4
    with cpu_slots(cores + 5, tmp_path) as waited:  # more than the machine has: all of it
        assert waited < 1


def test_calls_in_a_shared_pool_run_in_the_same_processes_with_the_same_results():
    items = list(range(12))
    alone = [square for square, _ in parallel_map(processes.square_in, items, 1, "alone", progress=False)]
    with shared_pool(2) as pool:
        first = list(parallel_map(processes.square_in, items, 2, "first", False, pool))
        second = list(parallel_map(processes.square_in, items[::-1], 2, "second", False, pool))
        # The pool's own processes. Not the first call's pids: a spawned worker still importing may take
        # none of a quick call's items, and then first serve the second call (seen in a run).
        workers = set(pool._processes)
    assert [square for square, _ in first] == alone == [x * x for x in items]
    assert [square for square, _ in second] == alone[::-1]
    used = {pid for _, pid in first} | {pid for _, pid in second}
    assert os.getpid() not in workers and used <= workers and len(workers) <= 2
    own = [pid for _, pid in parallel_map(processes.square_in, items, 2, "own", progress=False)]
    assert not set(own) & workers  # without a pool, a call starts processes of its own


def test_a_shared_pool_of_one_worker_runs_in_this_process():
    with shared_pool(1) as pool:
        assert pool is None
        assert {pid for _, pid in parallel_map(processes.square_in, [1, 2], 1, "one", False, pool)} == {
            os.getpid()
        }
