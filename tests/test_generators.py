"""Procedural shapes, sampling and rendering: canonical pose, normalisation, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from perception.data.points import SamplingSpec, instance_rng, procedural_instance
from perception.data.render import Camera, partial_scan, render_depth_normals
from perception.data.sampling import normalise_mesh, sample_surface, triangle_areas
from perception.data.shapes import SHAPE_NAMES, deform, make_shape, subdivide

SPEC = SamplingSpec(num_points=512)


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_every_class_is_centred_in_the_unit_ball(name):
    inst = procedural_instance(name, 0.3, SPEC, seed=1, key=(0, 0, 0, 0))
    assert inst.points.shape == (512, 3) and inst.points.dtype == np.float32
    assert np.abs(inst.points.mean(axis=0)).max() < 1e-5
    assert np.isclose(np.linalg.norm(inst.points, axis=1).max(), 1.0, atol=1e-6)
    # The mesh is normalised too (the image stage renders it): inside the unit ball, touching it.
    radii = np.linalg.norm(inst.vertices[np.unique(inst.faces)], axis=1)
    assert radii.max() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_instances_of_a_class_differ_in_shape_not_only_in_size(name):
    extents = []
    for i in range(6):
        v, f = make_shape(name, instance_rng(3, (i,)), anisotropy=0.3)
        v = normalise_mesh(v, f)
        extents.append(np.sort(v.max(0) - v.min(0)))
    extents = np.array(extents)
    # After normalisation size is gone, so any spread left in the extents is a difference of proportions.
    assert extents.std(axis=0).max() > 0.02


def _points(name: str, n: int = 4000) -> np.ndarray:
    return procedural_instance(name, 0.0, SamplingSpec(n), seed=0, key=(1,)).points


def test_canonical_pose_up_axis_is_plus_z():
    cone = _points("cone")
    tip = cone[cone[:, 2] > np.quantile(cone[:, 2], 0.99)]
    assert (
        np.linalg.norm(tip[:, :2] - cone[:, :2].mean(0), axis=1).max() < 0.15
    )  # apex on the axis, at the top
    arrow = _points("arrow")
    r = np.linalg.norm(arrow[:, :2], axis=1)
    assert arrow[r > np.quantile(r, 0.9), 2].mean() > 0  # the head (widest part) points up
    torus = _points("torus")
    assert np.linalg.norm(torus[:, :2], axis=1).min() > 0.2  # the hole is around z
    assert np.ptp(torus[:, 2]) < np.ptp(torus[:, 0])  # flat in z
    cylinder = _points("cylinder")
    side = cylinder[np.abs(cylinder[:, 2]) < 0.5 * np.abs(cylinder[:, 2]).max()]
    radial = np.linalg.norm(side[:, :2] - side[:, :2].mean(0), axis=1)
    assert np.quantile(radial, 0.9) - np.quantile(radial, 0.1) < 0.05  # a circle around z on the sides


def test_pyramid_points_up_and_prism_has_flat_sides():
    pyramid = _points("pyramid")
    tip = pyramid[pyramid[:, 2] > np.quantile(pyramid[:, 2], 0.99)]
    assert (
        np.linalg.norm(tip[:, :2] - pyramid[:, :2].mean(0), axis=1).max() < 0.15
    )  # apex on the axis, on top
    prism = _points("prism")
    side = prism[np.abs(prism[:, 2]) < 0.5 * np.abs(prism[:, 2]).max()]
    radial = np.linalg.norm(side[:, :2] - side[:, :2].mean(0), axis=1)
    assert np.quantile(radial, 0.95) - np.quantile(radial, 0.05) > 0.05  # a polygon, not a circle, around z


def test_rounded_box_lies_between_box_and_sphere():
    # How far the cloud reaches into the corners of its bounding box: box 1, ellipsoid about 0.58.
    def corner_reach(points):
        scaled = points / np.abs(points).max(axis=0)
        return np.abs(scaled).min(axis=1).max()

    reach = [corner_reach(_points(name)) for name in ("sphere", "rounded_box", "box")]
    assert reach[0] < reach[1] < reach[2]


def test_box_faces_are_axis_aligned():
    box = _points("box")
    lo, hi = box.min(0), box.max(0)
    on_a_face = np.isclose(box, lo, atol=1e-5) | np.isclose(box, hi, atol=1e-5)
    assert on_a_face.any(axis=1).all()


def test_surface_sampling_is_uniform_by_area():
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [5, 0, 0], [8, 0, 0], [5, 2, 0]], dtype=float)
    faces = np.array([[0, 1, 2], [3, 4, 5]])  # areas 0.5 and 3
    points = sample_surface(vertices, faces, 20000, np.random.default_rng(0))
    share = (points[:, 0] >= 5).mean()
    assert share == pytest.approx(3 / 3.5, abs=0.01)
    assert np.isclose(triangle_areas(vertices, faces), [0.5, 3]).all()


def test_same_seed_same_bytes_other_seed_other_points():
    a = procedural_instance("torus", 0.3, SPEC, seed=5, key=(0, 1, 2, 3))
    b = procedural_instance("torus", 0.3, SPEC, seed=5, key=(0, 1, 2, 3))
    c = procedural_instance("torus", 0.3, SPEC, seed=6, key=(0, 1, 2, 3))
    assert a.points.tobytes() == b.points.tobytes() and a.vertices.tobytes() == b.vertices.tobytes()
    assert not np.array_equal(a.points, c.points)


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_deformation_zero_is_the_undeformed_generator_and_deformed_instances_are_reproducible(name):
    key = (0, 1, 2, 3)
    plain = procedural_instance(name, 0.3, SPEC, seed=5, key=key)
    zero = procedural_instance(name, 0.3, SPEC, seed=5, key=key, deformation=0.0)
    assert plain.points.tobytes() == zero.points.tobytes() and plain.faces.tobytes() == zero.faces.tobytes()
    a = procedural_instance(name, 0.3, SPEC, seed=5, key=key, deformation=0.7)
    b = procedural_instance(name, 0.3, SPEC, seed=5, key=key, deformation=0.7)
    assert a.points.tobytes() == b.points.tobytes() and a.vertices.tobytes() == b.vertices.tobytes()
    assert not np.array_equal(a.points, plain.points)
    assert np.abs(a.points.mean(axis=0)).max() < 1e-5
    assert np.isclose(np.linalg.norm(a.points, axis=1).max(), 1.0, atol=1e-6)


@pytest.mark.parametrize("deformation", [-0.1, 1.5, float("nan")])
def test_deformation_outside_zero_one_is_refused(deformation):
    with pytest.raises(ValueError, match="deformation"):
        make_shape("box", np.random.default_rng(0), 0.3, deformation)


def test_deformations_keep_z_as_the_axis_and_change_the_shape():
    rng = np.random.default_rng(0)
    vertices = np.array([[1.0, 0.0, -1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.5]])
    for _ in range(20):
        moved = deform(vertices, rng, 1.0)
        assert np.array_equal(moved[:, 2], vertices[:, 2])  # heights are kept: +z stays up
        # The axis point at mid-height stays put (taper and twist scale and turn about it, bend is 0 there).
        assert np.allclose(moved[2], vertices[2])
    assert np.array_equal(deform(vertices, rng, 0.0), vertices)
    # Deformed instances of one class vary more than undeformed ones (the extents of a twisted box change).
    spreads = []
    for strength in (0.0, 1.0):
        extents = []
        for i in range(8):
            v, f = make_shape("box", np.random.default_rng(i), 0.0, strength)
            v = normalise_mesh(v, f)
            extents.append(np.sort(v.max(0) - v.min(0)))
        spreads.append(np.array(extents).std(axis=0).sum())
    assert spreads[1] > spreads[0]


def test_subdivision_splits_every_face_into_four_and_keeps_the_surface():
    vertices, faces = make_shape("tetrahedron", np.random.default_rng(0), 0.0)
    fine_vertices, fine_faces = subdivide(vertices, faces)
    assert len(fine_faces) == 4 * len(faces)
    assert len(fine_vertices) == len(vertices) + 6  # a tetrahedron has 6 edges: each midpoint made once
    assert triangle_areas(fine_vertices, fine_faces).sum() == pytest.approx(
        triangle_areas(vertices, faces).sum()
    )
    # Still closed: every edge is shared by exactly two faces.
    edges = np.sort(
        np.concatenate([fine_faces[:, [0, 1]], fine_faces[:, [1, 2]], fine_faces[:, [2, 0]]]), axis=1
    )
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert (counts == 2).all()


def test_noise_and_partial_scans():
    clean = procedural_instance("sphere", 0.0, SamplingSpec(256), 0, (0,))
    noisy = procedural_instance("sphere", 0.0, SamplingSpec(256, noise_std=0.05), 0, (0,))
    assert not np.array_equal(clean.points, noisy.points)
    assert np.abs(noisy.points.mean(0)).max() < 1e-5  # still centred after noise

    vertices, faces = make_shape("sphere", np.random.default_rng(0), anisotropy=0.0)
    vertices = normalise_mesh(vertices, faces)
    view = np.array([0.0, 0.0, 1.0])
    scan = partial_scan(vertices, faces, 300, np.random.default_rng(0), view)
    assert scan.shape == (300, 3)
    # From distance 3 a unit sphere shows only the cap facing the camera: p . view >= 1/3.
    assert (scan @ view).min() > 0.3
    partial = procedural_instance("sphere", 0.0, SamplingSpec(256, partial=True), 0, (0,))
    assert np.abs(partial.points.mean(0)).max() < 1e-5


def test_render_channels_depth_and_normals():
    vertices, faces = make_shape("sphere", np.random.default_rng(0), anisotropy=0.0)
    vertices = normalise_mesh(vertices, faces)
    camera = Camera()
    image = render_depth_normals(vertices, faces, camera, 32)
    assert image.shape == (4, 32, 32) and image.dtype == np.float32
    hit = image[0] > 0
    assert hit[16, 16] and not hit[0, 0]  # the sphere is in the middle, the corners are background
    assert (image[0][hit] <= 1).all() and (image[0][hit] >= 0).all()
    norms = np.linalg.norm(image[1:], axis=0)
    assert np.allclose(norms[hit], 1.0, atol=1e-4) and (norms[~hit] == 0).all()
    assert (image[3][hit] > -1e-4).all()  # normals face the camera
    # The centre pixel sees the sphere's nearest point: depth (2.5 + 1 - 1.5) / 2 = 1.0 there, normal ~ +z.
    assert image[0, 16, 16] == pytest.approx(1.0, abs=0.02)
    assert image[3, 16, 16] == pytest.approx(1.0, abs=0.02)
    again = render_depth_normals(vertices, faces, camera, 32)
    assert image.tobytes() == again.tobytes()


def test_render_at_higher_resolution_sees_the_same_scene():
    vertices, faces = make_shape("box", np.random.default_rng(0), anisotropy=0.0)
    vertices = normalise_mesh(vertices, faces)
    low = render_depth_normals(vertices, faces, Camera(), 16)
    high = render_depth_normals(vertices, faces, Camera(), 64)
    # Same field of view: the silhouette covers the same share of the image at both resolutions.
    assert (low[0] > 0).mean() == pytest.approx((high[0] > 0).mean(), abs=0.03)
