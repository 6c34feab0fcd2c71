"""The data stages as functions: outputs, manifest, skipped files, determinism, atomic writes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from perception.data.arrays import DatasetError, open_dataset
from pipeline.stages.prepare_images import prepare_images
from pipeline.stages.prepare_points import DataError, prepare_points
from tests.conftest import (
    CUBE_QUADS,
    CUBE_TRIANGLES,
    CUBE_VERTICES,
    off_text,
    ply_ascii_points,
    stl_binary,
    wait_for,
)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_procedural_points_outputs_manifest_and_class_balance(tmp_path, tiny_config):
    config = tiny_config()
    manifest = prepare_points(config, tmp_path / "points")
    ds = open_dataset(tmp_path / "points", "points")
    assert ds.array("train_points").shape == (4 * 3, 64, 3)
    assert ds.array("test_points").shape == (4 * 2, 64, 3)
    assert manifest["classes"] == ["box", "sphere", "cone", "torus"]
    assert manifest["splits"]["train"]["per_class"] == {"box": 3, "sphere": 3, "cone": 3, "torus": 3}
    assert np.bincount(ds.array("test_labels")).tolist() == [2, 2, 2, 2]
    assert manifest["seed"] == 7 and manifest["params"]["num_points"] == 64
    assert manifest["up_axis"] == "+z" and manifest["skipped"] == []
    for name, entry in manifest["files"].items():
        assert len(entry["sha256"]) == 64, name
    assert not list(tmp_path.glob(".points.tmp-*"))


def test_same_params_give_identical_bytes_whatever_the_worker_count(tmp_path, tiny_config):
    prepare_points(tiny_config(runtime={"workers": 1}), tmp_path / "a")
    prepare_points(tiny_config(runtime={"workers": 2}), tmp_path / "b")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    prepare_images(tiny_config(runtime={"workers": 1}), tmp_path / "a", tmp_path / "ia")
    prepare_images(tiny_config(runtime={"workers": 2}), tmp_path / "b", tmp_path / "ib")
    assert _files(tmp_path / "ia") == _files(tmp_path / "ib")
    prepare_points(tiny_config(seed=8), tmp_path / "c")
    assert _files(tmp_path / "a")["train_points.npy"] != _files(tmp_path / "c")["train_points.npy"]


def test_images_render_every_instance_on_every_canvas(tmp_path, tiny_config):
    config = tiny_config()
    prepare_points(config, tmp_path / "points")
    manifest = prepare_images(config, tmp_path / "points", tmp_path / "images")
    ds = open_dataset(tmp_path / "images", "images")
    assert ds.array("train_r16").shape == (12, 4, 16, 16)
    assert ds.array("test_r16").shape == (8, 4, 16, 16)
    for canvas in (24, 32):
        for kind in ("fov", "centre", "corner"):
            assert ds.array(f"test_{kind}_r{canvas}").shape == (8, 4, canvas, canvas)
        assert ds.array(f"test_scaled{canvas}_r16").shape == (8, 4, 16, 16)
    points = open_dataset(tmp_path / "points", "points")
    assert np.array_equal(ds.array("test_labels"), points.array("test_labels"))
    assert manifest["channels"] == ["depth", "normal_x", "normal_y", "normal_z"]
    assert manifest["resolutions"] == [16, 24, 32] and manifest["object_size"] == 8
    for name in ("test_r16", "test_fov_r32", "test_centre_r32", "test_scaled32_r16"):
        images = ds.array(name)
        assert ((images[:, 0] > 0).sum(axis=(1, 2)) >= 4).all(), name  # every object is in view


def _write_folder_dataset(root):
    good = off_text(CUBE_VERTICES, CUBE_QUADS, quirk=True)
    files = {
        "chair/train/a.off": good,
        "chair/train/b.stl": stl_binary(CUBE_VERTICES[CUBE_TRIANGLES] * [1, 1, 3]),
        "chair/train/empty.off": "",
        "chair/test/c.off": good,
        "chair/test/points.ply": ply_ascii_points(CUBE_VERTICES),
        "table/train/d.off": off_text(CUBE_VERTICES * [3, 3, 0.3], CUBE_QUADS),
        "table/train/broken.off": "OFF123 456 0\n",
        "table/test/e.off": off_text(CUBE_VERTICES * [3, 3, 0.3], CUBE_QUADS),
    }
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


def test_folder_dataset_uses_every_usable_file_and_lists_the_rest(tmp_path, tiny_config, capsys):
    _write_folder_dataset(tmp_path / "ds")
    config = tiny_config(points={"source": "folder", "root": str(tmp_path / "ds")})
    manifest = prepare_points(config, tmp_path / "points")
    assert manifest["classes"] == ["chair", "table"]
    assert manifest["splits"]["train"]["sources"] == [
        "chair/train/a.off",
        "chair/train/b.stl",
        "table/train/d.off",
    ]
    # A PLY without faces is a point cloud: it sits beside the meshes, its 8 points drawn again to 64.
    assert manifest["splits"]["test"]["sources"] == [
        "chair/test/c.off",
        "chair/test/points.ply",
        "table/test/e.off",
    ]
    assert manifest["splits"]["test"]["repeated"] == 1 and manifest["render_from"] == "points"
    skipped = {e["file"]: e["reason"] for e in manifest["skipped"]}
    assert set(skipped) == {"chair/train/empty.off", "table/train/broken.off"}
    assert "empty file" in skipped["chair/train/empty.off"]
    assert "unreadable OFF" in skipped["table/train/broken.off"]
    out = capsys.readouterr().out
    for file, reason in skipped.items():
        assert f"skipped {file}: {reason}" in out
    assert set(manifest["source_files"]) == {
        "chair/train/a.off", "chair/train/b.stl", "chair/train/empty.off", "chair/test/c.off",
        "chair/test/points.ply", "table/train/d.off", "table/train/broken.off", "table/test/e.off",
    }  # fmt: skip
    images = prepare_images(config, tmp_path / "points", tmp_path / "images")  # from points, meshes too
    assert images["rendered_from"].startswith("points")


def test_a_folder_of_meshes_alone_is_rendered_from_its_meshes(tmp_path, tiny_config):
    _write_folder_dataset(tmp_path / "ds")
    (tmp_path / "ds/chair/test/points.ply").unlink()
    config = tiny_config(points={"source": "folder", "root": str(tmp_path / "ds")})
    assert prepare_points(config, tmp_path / "points")["render_from"] == "meshes"
    assert prepare_images(config, tmp_path / "points", tmp_path / "images")["rendered_from"].startswith(
        "meshes"
    )


def test_a_class_with_no_usable_mesh_fails_and_writes_nothing(tmp_path, tiny_config):
    _write_folder_dataset(tmp_path / "ds")
    for path in (tmp_path / "ds" / "table").rglob("*.off"):
        path.write_text("OFF\n3 0 0\n0 0 0\n1 0 0\n0 1 0\n")  # points only
    config = tiny_config(points={"source": "folder", "root": str(tmp_path / "ds")})
    with pytest.raises(
        DataError,
        match=r"class .table. of points.root = .* no usable file or cloud \(table/train/broken.off: no face",
    ):
        prepare_points(config, tmp_path / "points")
    assert not (tmp_path / "points").exists()
    assert not list(tmp_path.glob(".points.tmp-*"))


def test_previous_output_survives_a_failed_run_and_stale_temporaries_are_removed(tmp_path, tiny_config):
    prepare_points(tiny_config(), tmp_path / "points")
    before = _files(tmp_path / "points")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f".points.tmp-{gone.pid}"  # a writer that is gone (killed) left it
    stale.mkdir()
    (stale / "train_points.npy").write_bytes(b"half")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "x" / "train").mkdir(parents=True)
    (tmp_path / "ds" / "x" / "test").mkdir()
    with pytest.raises(DataError):
        prepare_points(
            tiny_config(points={"source": "folder", "root": str(tmp_path / "ds")}), tmp_path / "points"
        )
    assert _files(tmp_path / "points") == before
    prepare_points(tiny_config(), tmp_path / "points")  # the next run that writes clears what a kill left
    assert not stale.exists()
    assert _files(tmp_path / "points") == before


WRITER_IN_ANOTHER_PROCESS = """
import sys, time
from pathlib import Path
from pipeline.outputs import atomic_output_dir
final, go = Path(sys.argv[1]), Path(sys.argv[2])
with atomic_output_dir(final) as folder:
    (folder / "written_by").write_text("the other writer")
    while not go.exists():
        time.sleep(0.01)
"""


def test_a_writer_leaves_a_running_writers_folder_alone_and_the_last_rename_wins(
    tmp_path, tiny_config, spawn
):
    """Two hand-run prepares on one output: the stage's writer removed the other's half-written folder as a
    killed run's leftover, and the other died renaming it (FileNotFoundError)."""
    out, go = tmp_path / "points", tmp_path / "go"
    # `spawn` kills it when the test ends: a failed assertion must not leave it waiting for ever
    other = spawn([sys.executable, "-c", WRITER_IN_ANOTHER_PROCESS, str(out), str(go)])
    theirs = tmp_path / f".points.tmp-{other.pid}"
    wait_for((theirs / "written_by").exists, 60, other, "the other writer's half-written folder", poll=0.01)
    prepare_points(tiny_config(), out)  # this writer, while the other is halfway
    assert (theirs / "written_by").read_text() == "the other writer"  # left alone
    assert (out / "manifest.json").exists()
    go.touch()
    assert other.wait(timeout=60) == 0
    assert _files(out) == {"written_by": b"the other writer"}  # it renamed last
    assert not list(tmp_path.glob(".points.tmp-*"))


WRITES_IN_A_LOOP = """
import os, sys, time
from pathlib import Path
from pipeline.outputs import atomic_output_dir
final, go, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
while not go.exists():
    time.sleep(0.001)
for write in range(count):
    with atomic_output_dir(final) as folder:
        for part in range(8):
            (folder / f"part{part}").write_text(f"{os.getpid()} {write}")
"""


def test_writers_that_rename_at_the_same_moment_all_finish_and_one_whole_output_wins(tmp_path, spawn):
    """Two writers of one output finishing together: removing the folder in place and then renaming raced
    (both removing one tree: FileNotFoundError; a rename onto the other's new folder: ENOTEMPTY)."""
    out, go = tmp_path / "out", tmp_path / "go"
    command = [sys.executable, "-c", WRITES_IN_A_LOOP, str(out), str(go), "300"]
    writers = [spawn(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    go.touch()
    errors = [writer.communicate(timeout=300)[1] for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0], errors
    parts = _files(out)
    assert len(parts) == 8 and len(set(parts.values())) == 1, parts  # one writer's one write, whole
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_corrupted_or_partial_datasets_are_refused_by_name(tmp_path, tiny_config):
    prepare_points(tiny_config(), tmp_path / "points")
    target = tmp_path / "points" / "train_points.npy"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="train_points.npy: content does not match"):
        open_dataset(tmp_path / "points", "points")
    target.unlink()
    with pytest.raises(DatasetError, match="train_points.npy: missing"):
        open_dataset(tmp_path / "points", "points")
    (tmp_path / "points" / "manifest.json").unlink()
    with pytest.raises(DatasetError, match="manifest.json: missing"):
        open_dataset(tmp_path / "points", "points")
    with pytest.raises(DatasetError, match="expected 'images'"):
        prepare_points(tiny_config(), tmp_path / "p2")
        open_dataset(tmp_path / "p2", "images")


def test_manifest_is_deterministic_json(tmp_path, tiny_config):
    prepare_points(tiny_config(), tmp_path / "points")
    manifest = json.loads((tmp_path / "points" / "manifest.json").read_text())
    assert "time" not in json.dumps(manifest).lower()
    assert manifest["generator"]["open3d"].startswith("0.")
