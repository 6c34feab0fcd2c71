"""Images rendered from points (perception.data.splat) against the ray-cast image of the same mesh: every
procedural class sampled at 2048 points, at the sprite sizes the image stage renders (16 and 32 px)."""

from __future__ import annotations

import numpy as np
import pytest

from perception.data.points import instance_rng
from perception.data.render import Camera, render_depth_normals
from perception.data.sampling import normalise_mesh, sample_surface
from perception.data.shapes import SHAPE_NAMES, make_shape
from perception.data.splat import estimate_normals, point_spacing, render_points

CAMERA = Camera()
IOU = 0.8  # the silhouettes agree
NORMAL_DEGREES = 20.0  # median angle between the two images' normals on their shared foreground
DEPTH = 0.02  # median |depth difference| on the shared foreground, in depth units ((distance + 1 - z) / 2)


def _pair(name: str, index: int, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    rng = instance_rng(1, (9, SHAPE_NAMES.index(name), index))
    vertices, faces = make_shape(name, rng, 0.3, 0.3)
    vertices = normalise_mesh(vertices, faces)
    points = sample_surface(vertices, faces, 2048, rng)
    meshed = render_depth_normals(vertices, faces, CAMERA, resolution)
    splatted = render_points(points, estimate_normals(points), CAMERA, resolution, point_spacing(points))
    return meshed, splatted


def _agreement(meshed: np.ndarray, splatted: np.ndarray) -> tuple[float, float, float]:
    """(silhouette IoU, median normal angle in degrees, median |depth difference|), the last two on the
    shared foreground."""
    a, b = meshed[0] > 0, splatted[0] > 0
    both = a & b
    cosine = (meshed[1:, both] * splatted[1:, both]).sum(axis=0).clip(-1, 1)
    return (
        float((a & b).sum() / (a | b).sum()),
        float(np.degrees(np.median(np.arccos(cosine)))),
        float(np.median(np.abs(meshed[0, both] - splatted[0, both]))),
    )


@pytest.mark.parametrize("resolution", [16, 32])
@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_a_splatted_cloud_matches_the_ray_cast_mesh(name, resolution):
    measured = [_agreement(*_pair(name, i, resolution)) for i in range(3)]
    ious, angles, depths = zip(*measured, strict=True)
    assert np.mean(ious) >= IOU, ious
    assert max(angles) <= NORMAL_DEGREES, angles
    assert max(depths) <= DEPTH, depths


def test_the_comparison_tells_another_shape_apart():
    """The bounds measure what they name: the cloud of another class, rendered the same way, fails them."""
    box, _ = _pair("box", 0, 32)
    _, arrow = _pair("arrow", 0, 32)
    iou, angle, depth = _agreement(box, arrow)
    assert iou < IOU and (angle > NORMAL_DEGREES or depth > DEPTH)


def test_an_empty_image_background_and_normals_face_the_camera():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(2048, 3))
    points /= np.linalg.norm(points, axis=1, keepdims=True)  # a unit sphere
    image = render_points(points, estimate_normals(points), CAMERA, 32, point_spacing(points))
    assert image.shape == (4, 32, 32) and image.dtype == np.float32
    foreground = image[0] > 0
    assert not foreground[0, 0] and foreground[16, 16]  # background corners, the sphere in the middle
    assert (image[1:, ~foreground] == 0).all()
    _, right, up, forward = CAMERA.frame()
    rays = CAMERA.rays(32)[:, 3:].astype(np.float64)  # [H*W, 3], world frame
    towards_eye = -np.stack([rays @ right, rays @ up, rays @ -forward])  # [3, H*W], camera frame
    facing = (image[1:].reshape(3, -1) * towards_eye).sum(axis=0)
    # Every normal faces the camera along its pixel's ray (turned by its own point's view, a splat beyond the
    # limb can lean a little past it).
    assert (facing[foreground.ravel()] >= -0.05).all()
    assert np.allclose(np.linalg.norm(image[1:, foreground], axis=0), 1, atol=1e-4)
