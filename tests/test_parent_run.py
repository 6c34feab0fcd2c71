"""Reopening the study's parent MLflow run on a restore: a store that did not answer once is not a run that
is gone. Taken for gone, the rerun logs every trial under a new parent run and the interrupted one keeps only
what live logging wrote before the outage: what the long-outage test in test_reliability_train.py once saw
(one variant's epochs, one run without any, one run missing). The rerun's first request comes after Ray's
start, ~5 s idle, when the MLflow server (uvicorn, 5 s keep-alive) may close the connection under it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from pipeline.tracking import store
from pipeline.tracking.parent_run import reopen_parent
from pipeline.tracking.store import TrackingUnavailable, retrying

URI = "http://127.0.0.1:5000"
# What MLflow's REST client raises when requests does (a refused or dropped connection): INTERNAL_ERROR.
DROPPED = (
    f"API request to {URI}/api/2.0/mlflow/runs/get failed with exception "
    "HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded with url: "
    "/api/2.0/mlflow/runs/get "
    "(Caused by ProtocolError('Connection aborted.', "
    "RemoteDisconnected('Remote end closed connection without response')))"
)


class Store:
    """The parts of an MLflow client that reopening uses, over runs held here; `get_run` fails the first
    `dropped` times as MLflow does on a dropped connection."""

    def __init__(self, runs: dict[str, str], dropped: int = 0):
        self.runs = {
            run_id: {"lifecycle": stage, "status": "RUNNING", "tags": {}} for run_id, stage in runs.items()
        }
        self.dropped = dropped

    def get_run(self, run_id: str):
        if self.dropped:
            self.dropped -= 1
            raise MlflowException(DROPPED)
        if run_id not in self.runs:
            raise MlflowException(f"Run '{run_id}' not found", error_code=RESOURCE_DOES_NOT_EXIST)
        run = self.runs[run_id]
        info = SimpleNamespace(lifecycle_stage=run["lifecycle"], status=run["status"])
        return SimpleNamespace(info=info, data=SimpleNamespace(tags=dict(run["tags"])))

    def update_run(self, run_id: str, status: str) -> None:
        self.runs[run_id]["status"] = status

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.runs[run_id]["tags"][key] = value


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch):
    monkeypatch.setattr(store.time, "sleep", lambda seconds: None)


def test_a_dropped_connection_reopens_the_same_parent_when_retried():
    client = Store({"parent": "active"}, dropped=1)
    client.runs["parent"]["status"] = "FAILED"
    logged: list[str] = []
    reopened = retrying(
        lambda: reopen_parent(client, "parent"), "opening the study's run", URI, 3, logged.append
    )
    assert reopened == "parent"
    assert client.runs["parent"]["status"] == "RUNNING" and client.runs["parent"]["tags"] == {"restores": "1"}
    assert len(logged) == 1 and "unreachable" in logged[0], logged


def test_a_store_that_stays_away_is_reported_not_taken_for_a_gone_run():
    client = Store({"parent": "active"}, dropped=100)
    with pytest.raises(TrackingUnavailable, match="still unreachable"):
        retrying(
            lambda: reopen_parent(client, "parent"), "opening the study's run", URI, 3, lambda line: None
        )


def test_a_deleted_or_unknown_parent_is_gone():
    client = Store({"deleted": "deleted"})
    assert reopen_parent(client, "deleted") is None
    assert reopen_parent(client, "elsewhere") is None  # another store, or the run removed
