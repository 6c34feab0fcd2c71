"""Claim 2's canvases: the placement geometry of every test set, the image stage's paired test sets (the
object keeps its training pixels on (b)'s larger canvases), determinism, and bad geometry refused."""

from __future__ import annotations

import numpy as np
import pytest

from perception.data.arrays import open_dataset
from perception.data.canvas import PLACEMENTS, check_geometry, paste, placement
from pipeline.config import ConfigError
from pipeline.stages.prepare_images import canvas_set_file, prepare_images
from pipeline.stages.prepare_points import prepare_points
from pipeline.stages.prepare_proximity import prepare_proximity

T, S = 32, 16  # the default training canvas and object size


@pytest.mark.parametrize("canvas", [48, 64])
@pytest.mark.parametrize("offset", [(0, 0), (16, 16), (3, 11)])
def test_each_test_set_changes_only_what_it_names(canvas, offset):
    k = canvas / T
    o = np.array(offset)
    side, size, at = placement("fov", o, T, S, canvas)  # (a): the whole image k times finer
    assert (side, size) == (canvas, k * S) and at == (round(k * o[0]), round(k * o[1]))
    for kind in ("centre", "corner"):  # (b): a larger canvas, the object at its training pixel size
        side, size, at = placement(kind, o, T, S, canvas)
        assert (side, size) == (canvas, S)
    assert placement("centre", o, T, S, canvas)[2] == ((canvas - S) // 2,) * 2
    assert placement("corner", o, T, S, canvas)[2] == (canvas - S, canvas - S)  # beyond the training grid
    side, size, at = placement("scaled", o, T, S, canvas)  # (c): the training canvas, the object scaled
    assert (side, size) == (T, k * S)
    # the same relative placement (an object at the far edge of its range stays there), in whole pixels
    room = T - size
    assert all(abs(a - f * room) <= 0.5 for a, f in zip(at, o / (T - S), strict=True))
    for kind in PLACEMENTS:
        side, size, at = placement(kind, o, T, S, canvas)
        assert 0 <= min(at) and max(at) + size <= side  # every object fits its canvas


def test_paste_puts_the_sprite_at_its_offset_and_refuses_one_that_does_not_fit():
    sprite = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3) + 1
    canvas = paste(sprite, 8, (2, 5))
    assert canvas.shape == (2, 8, 8) and np.array_equal(canvas[:, 2:5, 5:8], sprite)
    assert canvas.sum() == sprite.sum()  # black elsewhere
    with pytest.raises(ValueError, match="does not fit"):
        paste(sprite, 8, (6, 0))


@pytest.mark.parametrize(
    "args, named",
    [
        ((32, 40, (64,), 4), "object_size = 40"),
        ((32, 16, (24,), 4), "below train_resolution"),
        ((32, 16, (50,), 4), "not a multiple of patch_size"),
        ((32, 12, (36,), 4), "whole pixels"),
        ((32, 16, (80,), 4), "at most 64"),
    ],
)
def test_bad_geometry_is_named(args, named):
    assert named in check_geometry(*args)
    assert check_geometry(32, 16, (48, 64), 4) == ""


def test_bad_geometry_is_a_config_error_before_any_work(tiny_config):
    with pytest.raises(ConfigError, match=r"images\.eval_resolutions: 48 scales the object"):
        tiny_config(images={"eval_resolutions": [48]})  # 48 * 8 / 16 = 24 px > the 16 px canvas
    with pytest.raises(ConfigError, match=r"proximity\.distractors"):
        tiny_config(proximity={"distractors": 100})
    with pytest.raises(ConfigError, match=r"proximity\.patch_size = 5"):
        tiny_config(proximity={"patch_size": 5})


def _bbox(image: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(np.abs(image).sum(axis=0))
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    from pipeline.config import parse_config
    from tests.conftest import TINY_PARAMS

    root = tmp_path_factory.mktemp("canvas")
    config = parse_config(TINY_PARAMS, root)
    prepare_points(config, root / "points", root)
    prepare_images(config, root / "points", root / "images")
    return config, root


def test_the_stage_writes_every_paired_set_from_the_same_instances(images_dir):
    config, root = images_dir
    data = open_dataset(root / "images", "images")
    im = config.images
    train_canvas, size = im.train_resolution, im.object_size
    inside = data.array(canvas_set_file("in", train_canvas, train_canvas))
    offsets = data.array("test_offsets")
    assert inside.shape[-1] == train_canvas and offsets.shape == (len(inside), 2)
    for canvas in im.eval_resolutions:
        centre = data.array(canvas_set_file("centre", canvas, train_canvas))
        corner = data.array(canvas_set_file("corner", canvas, train_canvas))
        assert centre.shape[-1] == corner.shape[-1] == canvas
        assert data.array(canvas_set_file("fov", canvas, train_canvas)).shape[-1] == canvas
        assert data.array(canvas_set_file("scaled", canvas, train_canvas)).shape[-1] == train_canvas
        for i in range(len(inside)):
            (r, c), c0 = offsets[i], (canvas - size) // 2
            sprite = inside[i][:, r : r + size, c : c + size]
            # (b): the very pixels of the training-scale object, on a larger black canvas
            assert np.array_equal(centre[i][:, c0 : c0 + size, c0 : c0 + size], sprite)
            assert np.array_equal(corner[i][:, canvas - size :, canvas - size :], sprite)
            assert np.abs(centre[i]).sum() == pytest.approx(np.abs(sprite).sum())
    # training images: objects at random positions, inside the canvas, at their offsets
    train, train_offsets = data.array(f"train_r{train_canvas}"), data.array("train_offsets")
    assert len({tuple(o) for o in train_offsets}) > 1
    for image, (r, c) in zip(train, train_offsets, strict=True):
        r0, r1, c0, c1 = _bbox(image)
        assert r <= r0 and r1 <= r + size and c <= c0 and c1 <= c + size


def test_the_fov_set_is_the_same_scene_rendered_finer(images_dir):
    config, root = images_dir
    data = open_dataset(root / "images", "images")
    train_canvas, canvas = config.images.train_resolution, max(config.images.eval_resolutions)
    k = canvas // train_canvas
    inside = data.array(canvas_set_file("in", train_canvas, train_canvas))
    fov = data.array(canvas_set_file("fov", canvas, train_canvas))
    # Box-downsampling the finer render gives back nearly the coarse one: the same scene, more pixels.
    coarse_depth = (inside[:, 0] > 0).astype(float)
    fine = fov[:, 0].reshape(len(fov), train_canvas, k, train_canvas, k).mean(axis=(2, 4))
    agreement = ((fine > 0.5) == (coarse_depth > 0.5)).mean()
    assert agreement > 0.9


def test_image_and_proximity_stages_are_byte_identical_for_any_worker_count(
    images_dir, tiny_config, tmp_path
):
    config, root = images_dir
    other = tiny_config(runtime={"workers": 2, "progress": False})
    prepare_images(other, root / "points", tmp_path / "images")
    for name in open_dataset(root / "images", "images").manifest["files"]:
        assert (root / "images" / name).read_bytes() == (tmp_path / "images" / name).read_bytes()
    prepare_proximity(config, tmp_path / "p1")
    prepare_proximity(other, tmp_path / "p2")
    for path in (tmp_path / "p1").iterdir():
        assert path.read_bytes() == (tmp_path / "p2" / path.name).read_bytes()
    proximity = open_dataset(tmp_path / "p1", "images")
    labels = proximity.array("test_labels")
    assert proximity.array(f"test_r{config.proximity.size}").shape[1:] == (1, 12, 12)
    assert labels.sum() == len(labels) // 2  # balanced
