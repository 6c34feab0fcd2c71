"""The MLflow review helpers' own logic: metric names every model shares, per-seed test accuracies with
intervals, the review link, the source and DVC-experiment tags."""

from __future__ import annotations

import numpy as np
import pytest

from perception.evaluation.intervals import BootstrapSettings
from pipeline.evaluation import evidence, metric_names
from pipeline.tracking import review


def test_every_model_shares_its_test_metric_names():
    assert metric_names.test_metric_name("points", "none") == "test_accuracy"
    assert metric_names.test_metric_name("points", "so3") == "test_accuracy_so3"
    assert metric_names.test_metric_name("images", "in") == "test_accuracy"
    assert metric_names.test_metric_name("images", "fov_64") == "test_accuracy_fov_64"
    # a different task on other images: never on the same chart as the shape classifiers
    assert metric_names.test_metric_name("proximity", "in") == "test_accuracy_proximity"


def test_a_seeds_test_accuracy_is_its_own_slice_with_an_interval_over_samples():
    settings = BootstrapSettings(resamples=500, seed=0)
    rng = np.random.default_rng(0)
    correct = {
        "none": rng.random((2, 200, 1)) < np.array([0.9, 0.3])[:, None, None],
        "so3": rng.random((2, 200, 4)) < 0.5,
    }
    accuracy = lambda c: evidence.accuracy(c, settings)  # noqa: E731
    first, second = (metric_names.trial_test_metrics(correct, "points", i, accuracy) for i in (0, 1))
    assert first["test_accuracy"] == pytest.approx(100 * correct["none"][0].mean())
    assert second["test_accuracy"] == pytest.approx(100 * correct["none"][1].mean())
    assert first["test_accuracy_lo"] < first["test_accuracy"] < first["test_accuracy_hi"]
    assert 5 < first["test_accuracy_hi"] - first["test_accuracy_lo"] < 20  # ~±4 points at n = 200
    assert set(first) == {f"test_accuracy{m}{e}" for m in ("", "_so3") for e in ("", "_lo", "_hi")}


def test_the_review_link_opens_the_runs_table_not_the_genai_overview():
    url = review.review_url("http://10.0.0.5:5000/", "7")
    assert url == "http://10.0.0.5:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert review.review_url("sqlite:////x/mlflow.db", "1").startswith(
        "http://127.0.0.1:5000/#/experiments/1/"
    )


def test_runs_name_their_stage_and_dvc_experiment(monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    tags = review.source_tags("train", "abc123")
    assert tags["mlflow.source.name"] == "python -m pipeline train" and "dvc.exp_name" not in tags
    assert tags["mlflow.source.git.commit"] == "abc123"
    monkeypatch.setenv("DVC_EXP_NAME", "wide-vit")
    tags = review.source_tags("evaluate", "abc123")
    assert tags["dvc.exp_name"] == "wide-vit"
    assert tags["mlflow.source.name"] == "python -m pipeline evaluate (dvc exp run -n wide-vit)"
