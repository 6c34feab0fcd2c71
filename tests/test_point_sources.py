"""`points.source` beyond procedural shapes: point-file folders, PointNet's ModelNet40 HDF5 and ScanObjectNN,
on fixtures in their exact layouts (tests/point_fixtures.py). Every source round-trips known points and
labels; up axes, slices, background masks, worker counts and every kind of bad input are checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from perception.data.arrays import open_dataset
from perception.data.benchmarks import SCANOBJECTNN_CLASSES
from perception.data.sampling import normalise_points
from pipeline.__main__ import main
from pipeline.config import ConfigError
from pipeline.stages.prepare_images import prepare_images
from pipeline.stages.prepare_points import prepare_points
from tests import point_fixtures as fx
from tests.conftest import TINY_PARAMS, merge, write_params

P = 64  # points per fixture cloud, and drawn per cloud: every point of a cloud is kept


def _same_points(a: np.ndarray, b: np.ndarray) -> bool:
    """The two clouds hold the same points, in any order."""
    order = lambda c: c[np.lexsort(c.T)]  # noqa: E731
    return np.allclose(order(a), order(b), atol=1e-5)


def _prepare(tiny_config, tmp_path: Path, points: dict, name: str = "points"):
    config = tiny_config(points={"num_points": P, **points})
    manifest = prepare_points(config, tmp_path / name)
    return config, manifest, open_dataset(tmp_path / name, "points")


# --- every source round-trips -------------------------------------------------------------------------------


def test_modelnet40_h5_round_trips_points_and_labels(tmp_path, tiny_config):
    root = fx.modelnet40_h5(tmp_path / "modelnet40_ply_hdf5_2048", {"train": 9, "test": 6})
    _, manifest, dataset = _prepare(tiny_config, tmp_path, {"source": "modelnet40_h5", "root": str(root)})
    assert manifest["classes"] == ["class0", "class1", "class2"] and manifest["render_from"] == "points"
    assert set(manifest["source_files"]) == {
        "ply_data_train0.h5", "ply_data_train1.h5", "ply_data_test0.h5", "shape_names.txt"
    } - {"shape_names.txt"}  # fmt: skip
    for split, count, seed in (("train", 9, 1), ("test", 6, 2)):
        data, labels = fx.clouds(count, P, seed, 3)
        out, out_labels = dataset.array(f"{split}_points"), dataset.array(f"{split}_labels")
        # Instances come grouped by class, in file order within a class.
        order = np.concatenate([np.flatnonzero(labels == c) for c in range(3)])
        assert out_labels.tolist() == labels[order].tolist()
        for got, i in zip(out, order, strict=True):
            assert _same_points(got, normalise_points(data[i].astype(np.float64)))
        assert manifest["splits"][split]["sources"][0].startswith(f"ply_data_{split}0.h5:")


def test_scanobjectnn_round_trips_each_variant_and_drops_the_background(tmp_path, tiny_config):
    root = fx.scanobjectnn_h5(tmp_path / "h5_files", {"train": 15, "test": 30})
    for variant in ("obj_only", "obj_bg", "pb_t50_rs"):
        _, manifest, dataset = _prepare(
            tiny_config, tmp_path, {"source": "scanobjectnn", "root": str(root), "variant": variant}, variant
        )
        assert manifest["classes"] == list(SCANOBJECTNN_CLASSES)
        assert next(iter(manifest["source_files"])).startswith(
            {"obj_only": "main_split_nobg/"}.get(variant, "main_split/")
        )
        data, labels = fx.clouds(30, P, 4, 15)
        data[:, P - 16 :] = 5.0
        order = np.concatenate([np.flatnonzero(labels == c) for c in range(15)])
        assert dataset.array("test_labels").tolist() == labels[order].tolist()
        assert _same_points(
            dataset.array("test_points")[0], normalise_points(data[order[0]].astype(np.float64))
        )
    _, manifest, dataset = _prepare(
        tiny_config, tmp_path, {"source": "scanobjectnn", "root": str(root), "drop_background": True}, "nobg"
    )
    data, labels = fx.clouds(30, P, 4, 15)
    first = data[np.flatnonzero(labels == 0)[0], : P - 16]  # the object's 48 points, drawn again to 64
    got = dataset.array("test_points")[0]
    # The object's points alone, some twice: the same set, up to the normalisation of the repeats' mean.
    unique = np.unique(got, axis=0).astype(np.float64)
    assert len(unique) == P - 16 and _same_points(
        normalise_points(unique), normalise_points(first.astype(np.float64))
    )
    assert manifest["splits"]["test"]["repeated"] == 30  # every cloud had 48 points for 64 asked


@pytest.mark.parametrize(
    "name", ["a_ascii.ply", "b.ply", "c_ascii.pcd", "d.pcd", "e.xyz", "f.txt", "g.pts", "h.npy"]
)
def test_a_folder_of_point_files_round_trips_every_format(tmp_path, tiny_config, name):
    data, _ = fx.clouds(4, P, 5, 2)
    for split in ("train", "test"):
        for c in range(2):
            fx.write_point_file(tmp_path / "ds" / f"c{c}" / split / name, data[2 * c + (split == "test")])
    _, manifest, dataset = _prepare(tiny_config, tmp_path, {"source": "folder", "root": str(tmp_path / "ds")})
    assert not manifest["skipped"] and manifest["render_from"] == "points"
    assert dataset.array("train_labels").tolist() == [0, 1]
    for c in range(2):
        assert _same_points(
            dataset.array("train_points")[c], normalise_points(data[2 * c].astype(np.float64))
        )


def test_a_y_up_object_is_turned_to_z_up(tmp_path, tiny_config):
    """A cone whose tip points to +y in the file has its tip at +z in the dataset (up_axis: y)."""
    rng = np.random.default_rng(0)
    height = rng.random(P)
    angle = rng.random(P) * 2 * np.pi
    cone = np.stack([(1 - height) * np.cos(angle), 2 * height, (1 - height) * np.sin(angle)], axis=1)
    for split in ("train", "test"):
        fx.write_point_file(tmp_path / "ds" / "cone" / split / "a.xyz", cone)
    for up, axis in (("y", 2), ("z", 1)):
        _, _, dataset = _prepare(
            tiny_config, tmp_path, {"source": "folder", "root": str(tmp_path / "ds"), "up_axis": up}, up
        )
        tip = dataset.array("train_points")[0]
        tip = tip[np.argmax(tip[:, axis])]
        assert tip[axis] > 0.6 and abs(tip[[i for i in range(3) if i != axis]]).max() < 0.15, (up, tip)


# --- slices, determinism ------------------------------------------------------------------------------------


def test_max_per_class_draws_the_same_slice_for_the_same_seed(tmp_path, tiny_config):
    root = fx.modelnet40_h5(tmp_path / "mn", {"train": 30, "test": 12})
    sources = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        config = tiny_config(
            seed=seed,
            points={"source": "modelnet40_h5", "root": str(root), "num_points": P, "max_per_class": 3},
        )
        manifest = prepare_points(config, tmp_path / name)
        assert all(
            n == 3 for split in ("train", "test") for n in manifest["splits"][split]["per_class"].values()
        )
        sources[name] = manifest["splits"]["train"]["sources"]
    assert sources["a"] == sources["b"] != sources["c"]
    whole = prepare_points(
        tiny_config(points={"source": "modelnet40_h5", "root": str(root), "num_points": P}), tmp_path / "all"
    )
    assert whole["splits"]["train"]["count"] == 30  # 0 = all


def test_the_same_bytes_for_one_and_two_workers(tmp_path, tiny_config):
    root = fx.scanobjectnn_h5(tmp_path / "h5_files", {"train": 15, "test": 15})
    hashes = []
    for workers in (1, 2):
        config = tiny_config(
            points={"source": "scanobjectnn", "root": str(root), "num_points": 32},
            runtime={"workers": workers},
        )
        points = prepare_points(config, tmp_path / f"p{workers}")
        images = prepare_images(config, tmp_path / f"p{workers}", tmp_path / f"i{workers}")
        hashes.append(
            (
                {k: v["sha256"] for k, v in points["files"].items()},
                {k: v["sha256"] for k, v in images["files"].items()},
            )
        )
    assert hashes[0] == hashes[1]


# --- bad input: one line before any work, nothing written ---------------------------------------------------


def _fails(tmp_path: Path, points: dict, expected: list[str], capfd) -> None:
    params = write_params(tmp_path / "params.yaml", merge(TINY_PARAMS, {"points": points}))
    out = tmp_path / "out"
    capfd.readouterr()
    code = main(["prepare-points", "--params", str(params), "--out", str(out)])
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    for part in expected:
        assert part in lines[0], (part, lines[0])
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def _h5_case(tmp_path: Path, change) -> dict:
    root = fx.modelnet40_h5(tmp_path / "mn", {"train": 6, "test": 3})
    change(root)
    return {"source": "modelnet40_h5", "root": str(root)}


def _rewrite(root: Path, **arrays) -> None:
    fx.write_h5(root / "ply_data_test0.h5", **arrays)


data3, labels3 = fx.clouds(3, P, 2, 3)
BAD_SOURCES = {
    "missing root": (
        lambda t: {"source": "modelnet40_h5", "root": str(t / "nowhere")},
        ["points.root = ", "nowhere", "no such folder", "modelnet40_ply_hdf5_2048"],
    ),
    "missing file": (
        lambda t: _h5_case(t, lambda r: (r / "ply_data_train1.h5").unlink()),
        ["ply_data_train1.h5: missing", "listed in"],
    ),
    "missing variant": (
        lambda t: {
            "source": "scanobjectnn",
            "root": str(fx.scanobjectnn_h5(t / "h5", {"train": 5, "test": 5}).parent / "elsewhere"),
        },
        ["points.root", "no such folder", "h5_files"],
    ),
    "no data key": (
        lambda t: _h5_case(t, lambda r: _rewrite(r, label=labels3[:, None])),
        ["ply_data_test0.h5: no 'data' dataset", "label"],
    ),
    "no label key": (
        lambda t: _h5_case(t, lambda r: _rewrite(r, data=data3)),
        ["ply_data_test0.h5: no 'label' dataset"],
    ),
    "counts differ": (
        lambda t: _h5_case(t, lambda r: _rewrite(r, data=data3, label=labels3[:2, None])),
        ["holds 3 clouds but label 2"],
    ),
    "label outside": (
        lambda t: _h5_case(t, lambda r: _rewrite(r, data=data3, label=np.array([[0], [7], [1]]))),
        ["label 7 of cloud 1 is outside the 3 classes"],
    ),
    "wrong shape": (
        lambda t: _h5_case(t, lambda r: _rewrite(r, data=data3[:, :, :2], label=labels3[:, None])),
        ["data has shape [3, 64, 2]", "float[clouds, points, 3]"],
    ),
    "nan": (
        lambda t: _h5_case(
            t,
            lambda r: _rewrite(
                r, data=np.where(np.arange(P)[None, :, None] == 5, np.nan, data3), label=labels3[:, None]
            ),
        ),
        ["data of cloud 0 has 1 NaN or infinite points"],
    ),
    "empty class": (
        lambda t: _h5_case(
            t, lambda r: (r / "shape_names.txt").write_text("class0\nclass1\nclass2\nclass3\n")
        ),
        ["class 'class3'", "has no usable file or cloud"],
    ),
}


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_bad_sources_fail_with_one_line_and_write_nothing(tmp_path, capfd, case):
    make, expected = BAD_SOURCES[case]
    _fails(tmp_path, make(tmp_path), expected, capfd)


def test_a_folder_lists_each_unusable_point_file_and_uses_the_rest(tmp_path, tiny_config):
    data, _ = fx.clouds(2, P, 6, 1)
    for split in ("train", "test"):
        fx.write_point_file(tmp_path / "ds" / "a" / split / "good.pcd", data[0])
    (tmp_path / "ds/a/train/empty.xyz").write_text("")
    (tmp_path / "ds/a/train/nan.xyz").write_text("0 0 0\nnan 1 1\n1 1 1\n")
    np.save(tmp_path / "ds/a/train/flat.npy", np.zeros((5, 2)))
    (tmp_path / "ds/a/train/garbage.pcd").write_text("not a point cloud\n")
    _, manifest, _ = _prepare(tiny_config, tmp_path, {"source": "folder", "root": str(tmp_path / "ds")})
    skipped = {e["file"]: e["reason"] for e in manifest["skipped"]}
    assert skipped == {
        "a/train/empty.xyz": "empty file",
        "a/train/flat.npy": "NPY array of shape [5, 2] float64; expected float[N, >= 3]",
        "a/train/garbage.pcd": "no points: PCD file unreadable or empty",
        "a/train/nan.xyz": "1 of 3 points have NaN or infinite coordinates",
    }
    assert manifest["splits"]["train"]["sources"] == ["a/train/good.pcd"]


def test_procedural_shapes_are_made_z_up():
    with pytest.raises(
        ConfigError, match="points.up_axis = 'y' is not allowed with points.source = 'procedural'"
    ):
        from pipeline.config import parse_config

        parse_config(merge(TINY_PARAMS, {"points": {"up_axis": "y"}}))


def test_the_manifest_records_every_source_files_sha256(tmp_path, tiny_config):
    root = fx.modelnet40_h5(tmp_path / "mn", {"train": 6, "test": 3})
    _, first, _ = _prepare(tiny_config, tmp_path, {"source": "modelnet40_h5", "root": str(root)}, "one")
    _rewrite(root, data=data3[::-1].copy(), label=labels3[::-1, None].astype(np.uint8))
    _, second, _ = _prepare(tiny_config, tmp_path, {"source": "modelnet40_h5", "root": str(root)}, "two")
    changed = {k for k in first["source_files"] if first["source_files"][k] != second["source_files"][k]}
    assert changed == {"ply_data_test0.h5"}
    assert json.loads((tmp_path / "one/manifest.json").read_text())["source_files"] == first["source_files"]


@pytest.mark.parametrize(
    "profile, make",
    [
        (
            "modelnet40",
            lambda t: fx.modelnet40_h5(t / "data/raw/modelnet40_ply_hdf5_2048", {"train": 6, "test": 3}),
        ),
        ("scanobjectnn", lambda t: fx.scanobjectnn_h5(t / "data/raw/h5_files", {"train": 15, "test": 15})),
    ],
)
def test_the_benchmark_profiles_are_the_default_study_on_their_source(tmp_path, profile, make):
    """Each profile is params.yaml with its own points section: valid where its data sit, y-up, a slice."""
    import yaml

    from pipeline.config import parse_config
    from tests.conftest import REPO

    make(tmp_path)
    params = yaml.safe_load((REPO / f"profiles/{profile}.yaml").read_text())
    config = parse_config(params, tmp_path)  # its root, relative to the params file, holds the dataset
    assert config.points.up_axis == "y" and config.points.max_per_class > 0
    default = yaml.safe_load((REPO / "params.yaml").read_text())
    assert {k: v for k, v in params.items() if k != "points"} == {
        k: v for k, v in default.items() if k != "points"
    }
