"""Unit tests of the train stage's logic: the search space, live status, what the evaluation refuses (the
training loop itself, perception.training, is tested in test_training_loop.py)."""

from __future__ import annotations

import io

import pytest
import torch

from perception.models import build
from pipeline.config import ConfigError, Domain, load_config, parse_config
from pipeline.training import space
from tests.conftest import REPO, TINY_PARAMS, merge


def _config(train: dict | None = None):
    params = merge(TINY_PARAMS, {})
    if train is not None:
        params["train"] = {"all_families": False, **train}  # just the listed models
    return parse_config(params)


# --- search space ------------------------------------------------------------------------------------------


def test_default_models_expand_into_the_studys_variants():
    names = [v.name for v in space.expand(_config())]
    assert names == [
        "e3nn",
        "dgcnn",
        *(f"vit-{p}" for p in ("learned", "sincos", "rope", "none")),
        "mamba_hybrid",
        "mamba",
        *(f"proximity_mamba-{o}" for o in ("rowmajor", "snake", "hilbert", "cross", "random")),
        "proximity_vit",
        "pointnet-none",
        "pointnet-z",
        "pointnet-so3",
    ]
    # and the repo's params.yaml lists the same variants, in the same order
    assert [v.name for v in space.expand(load_config(REPO / "params.yaml"))] == names


def test_grid_values_are_fixed_per_variant_and_sampled_values_stay_domains():
    config = _config(
        {"models": {"vit": {"dim": {"choice": [32, 64]}, "lr": {"loguniform": [1e-4, 1e-2]}, "depth": 2}}}
    )
    (variant,) = space.expand(config)
    assert variant.fixed == {"size": "tiny", "depth": 2}
    assert variant.searched == {"dim": Domain("choice", (32, 64)), "lr": Domain("loguniform", (1e-4, 1e-2))}
    assert space.is_search(config, [variant])


def test_two_entries_of_one_family_are_separate_variants():
    config = _config({"models": {"vit-small-patch": {"family": "vit", "patch_size": 4}, "vit": {}}})
    variants = space.expand(config)
    assert [(v.name, v.family) for v in variants] == [("vit-small-patch", "vit"), ("vit", "vit")]


def test_tune_space_resolves_to_one_flat_config_per_trial():
    from ray.tune.search.variant_generator import generate_variants

    config = _config(
        {"models": {"pointnet": {"augment": {"grid": ["none", "so3"]}, "lr": {"uniform": [0.1, 0.2]}}}}
    )
    variants = space.expand(config)
    flat = {"seed": 7, "train.epochs": 3}
    resolved = [
        space.resolved(spec) for _, spec in generate_variants(space.param_space(config, variants, flat))
    ]
    # Every variant once per training seed (TINY_PARAMS: seeds 0 and 1).
    assert sorted((r["trial.name"], r["trial.seed"]) for r in resolved) == [
        ("pointnet-none", 0),
        ("pointnet-none", 1),
        ("pointnet-so3", 0),
        ("pointnet-so3", 1),
    ]
    for r in resolved:
        assert 0.1 <= r["trial.lr"] <= 0.2 and r["train.epochs"] == 3
        assert all(not isinstance(v, dict) for v in r.values())
    labels = {
        space.trial_label(spec) for _, spec in generate_variants(space.param_space(config, variants, flat))
    }
    assert labels == {"pointnet-none-s0", "pointnet-none-s1", "pointnet-so3-s0", "pointnet-so3-s1"}


def test_a_model_entry_sets_its_own_epochs_and_the_others_keep_the_studys():
    from pipeline.training.trainable import trial_settings

    config = _config({"models": {"vit": {"epochs": 20}, "pointnet": {}}, "epochs": 3})
    variants = space.expand(config)
    space.check(config, variants, num_classes=4, in_channels=4)
    assert space.max_epochs(config, variants) == 20
    by_name = {v.name: v for v in variants}
    for name, expected in [("vit", 20), ("pointnet", 3)]:
        trial = {"trial": by_name[name].as_trial(), "trial_seed": 0}
        flat = space.resolved(
            {
                **trial,
                "train.epochs": 3,
                "train.lr": 1e-3,
                "train.weight_decay": 0.0,
                "train.batch_size": 8,
                "train.points_per_cloud": 0,
                "train.warmup_epochs": 0,
                "train.grad_clip": 0.0,
            }
        )
        assert trial_settings(flat)["epochs"] == expected == space.trial_epochs(config, trial)


def test_the_run_line_names_the_studys_epochs_only_where_a_variant_trains_them():
    from pipeline.training.session import epochs_text

    some = _config({"models": {"vit": {"epochs": 20}, "pointnet": {}}, "epochs": 3})
    assert epochs_text(some, space.expand(some)) == "3 epochs (vit 20)"
    every = _config({"models": {"vit": {"epochs": 20}, "pointnet": {"epochs": 5}}, "epochs": 3})
    assert epochs_text(every, space.expand(every)) == "epochs: vit 20, pointnet 5"


BAD_TRAIN = [
    ({"models": {"resnet": {}}}, "train.models.resnet.family = 'resnet' is not allowed"),
    (
        {"models": {"vit": {"dim": [32, 64]}}},
        "train.models.vit.dim = [32, 64] is not allowed: a list must say",
    ),
    ({"models": {"vit": {"dim": {"range": [1, 2]}}}}, "expected a fixed value or one of {grid: [...]}"),
    ({"models": {"vit": {"lr": {"loguniform": [0, 1]}}}}, "train.models.vit.lr.loguniform = [0, 1]"),
    ({"models": {"vit": {"lr": {"uniform": [2, 1]}}}}, "low < high"),
    ({"models": {}}, "train.models = {} is not allowed"),
    ({"epochs": 0}, "train.epochs = 0 is not allowed"),
    ({"scheduler": "hyperband"}, "train.scheduler = 'hyperband' is not allowed"),
    ({"fault": {"model": 3}}, "train.fault.model = 3"),
]


@pytest.mark.parametrize("train,message", BAD_TRAIN)
def test_bad_train_params_fail_with_one_line(train, message):
    with pytest.raises(ConfigError) as err:
        space.expand(_config(train))
    assert message in str(err.value) and "\n" not in str(err.value)


BAD_VARIANTS = [
    ({"models": {"vit": {"dim": 30}}}, "train.models.vit: ViTConfig.dim = 30 is not allowed"),
    ({"models": {"vit": {"dmi": 30}}}, "train.models.vit: ViTConfig.dmi: unknown hparam"),
    ({"models": {"vit": {"augment": "so3"}}}, "train.models.vit.augment: only point models take it"),
    ({"models": {"pointnet": {"augment": "x"}}}, "train.models.pointnet.augment = 'x' is not allowed"),
    ({"models": {"vit": {"size": "huge"}}}, "size 'huge' is not allowed"),
    ({"models": {"mamba_hybrid": {"scan_order": {"grid": ["rowmajor", "zigzag"]}}}}, "scan_order = 'zigzag'"),
    ({"models": {"vit": {"depth": {"randint": [0, 3]}}}}, "ViTConfig.depth = 0 is not allowed"),
    ({"models": {"vit": {}}, "fault": {"model": "dgcnn", "epoch": 1}}, "train.fault.model = 'dgcnn'"),
    ({"models": {"vit": {"warmup_epochs": 8}}}, "train.models.vit.warmup_epochs = 8 is not allowed"),
    ({"models": {"vit": {"grad_clip": -1}}}, "train.models.vit.grad_clip = -1 is not allowed"),
    ({"models": {"vit": {"task": "detection"}}}, "train.models.vit.task = 'detection' is not allowed"),
    ({"models": {"dgcnn": {"task": "proximity"}}}, "dgcnn is a point model"),
    # an entry's own train.* settings, by the train.* field's rule (a batch of 0 crashed inside the trial)
    ({"models": {"vit": {"batch_size": 0}}}, "vit.batch_size = 0 is not allowed: expected an integer"),
    ({"models": {"vit": {"batch_size": {"choice": [16, -2]}}}}, "train.models.vit.batch_size = -2 is not"),
    ({"models": {"vit": {"lr": 0}}}, "train.models.vit.lr = 0 is not allowed: expected a number from 1e-08"),
    ({"models": {"dgcnn": {"weight_decay": -0.1}}}, "train.models.dgcnn.weight_decay = -0.1 is not allowed"),
    ({"models": {"dgcnn": {"points_per_cloud": -1}}}, "train.models.dgcnn.points_per_cloud = -1 is not"),
]


@pytest.mark.parametrize("train,message", BAD_VARIANTS)
def test_bad_variants_are_caught_before_ray_starts(train, message):
    config = _config(train)
    with pytest.raises(ConfigError) as err:
        space.check(config, space.expand(config), num_classes=4, in_channels=4)
    assert message in str(err.value) and "\n" not in str(err.value)


# --- where things go, and what the live status says ---------------------------------------------------------


def test_tracking_uri_param_then_environment_then_the_repos_sqlite(tmp_path, monkeypatch):
    from pipeline.tracking.store import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri("", tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri("", tmp_path) == "http://127.0.0.1:5000"
    assert tracking_uri("sqlite:////elsewhere.db", tmp_path) == "sqlite:////elsewhere.db"


class _Trial:
    def __init__(self, trial_id: str, name: str):
        self.trial_id, self.config = trial_id, {"trial": {"name": name}, "trial_seed": 3}


def test_live_status_counts_trials_and_tracks_the_best(tmp_path):
    from pipeline.training.status import LiveStatus

    out = io.StringIO()
    status = LiveStatus(total=2, out=out, every_s=0.0)
    a, b = _Trial("a", "vit"), _Trial("b", "e3nn")
    status.on_trial_start(0, [], a)
    status.on_trial_start(0, [], b)
    status.on_trial_result(0, [], a, {"val_accuracy": 0.5})
    status.on_trial_recover(0, [], b)
    status.on_trial_start(0, [], b)
    status.on_trial_result(0, [], b, {"val_accuracy": 0.75})
    status.on_trial_complete(0, [], a)
    status.on_trial_complete(0, [], b)
    lines = out.getvalue().splitlines()
    assert "e3nn-s3 failed; retrying from its last checkpoint" in lines[3]
    assert lines[-1].endswith(
        "0 running, 2/2 done, 0 failed | best val_accuracy 0.750 (e3nn-s3) | finished e3nn-s3"
    )
    assert all(line.startswith("[train 0:00]") for line in lines)


def test_an_unreachable_cluster_address_fails_in_seconds_naming_it():
    import socket

    from pipeline.config import ConfigError
    from pipeline.training.session import check_reachable

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConfigError, match=rf"RAY_ADDRESS = '127.0.0.1:{port}': no Ray cluster answers there"):
        check_reachable(f"127.0.0.1:{port}")
    check_reachable("auto")  # resolved by Ray itself


# --- checkpoints the evaluation refuses -------------------------------------------------------------------


class _Payload:
    """Unpickling this would call os.system: a weights-only load must refuse it without running it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["truncated", "malicious", "not a checkpoint"])
def test_an_unusable_checkpoint_fails_naming_the_file_and_runs_nothing(tmp_path, kind):
    from perception.data.arrays import DatasetError
    from pipeline.evaluation.measurements import load_checkpoints

    models = tmp_path / "train" / "models" / "vit"
    models.mkdir(parents=True)
    path = models / "seed-0.pt"
    marker = tmp_path / "payload-ran"
    if kind == "truncated":
        buffer = io.BytesIO()
        torch.save({"state_dict": build("vit").state_dict(), "config": {}}, buffer)
        path.write_bytes(buffer.getvalue()[:1000])
    elif kind == "malicious":
        torch.save({"state_dict": {}, "config": _Payload(str(marker))}, path)
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(DatasetError, match=rf"^{path}: not a usable checkpoint \(") as err:
        load_checkpoints(tmp_path / "train")
    assert "\n" not in str(err.value) and "retrain: `dvc repro -f -s train && dvc repro`" in str(err.value)
    assert not marker.exists()
