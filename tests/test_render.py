"""perception.data.render's ray caster: the fast path against its reference, against open3d's Embree, and
the same bytes whatever SIMD paths numpy and OpenBLAS take."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from perception._open3d import import_open3d
from perception.data.points import instance_rng
from perception.data.render import (
    Camera,
    cast_pinhole,
    cast_pinhole_ref,
    pinhole_rays,
)
from perception.data.sampling import normalise_mesh
from perception.data.shapes import SHAPE_NAMES, make_shape

REPO = Path(__file__).resolve().parents[1]


def _mesh(name: str, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = instance_rng(3, (SHAPE_NAMES.index(name), index))
    vertices, faces = make_shape(name, rng, 0.3, 0.3)
    return normalise_mesh(vertices, faces), faces


@pytest.mark.parametrize("name", SHAPE_NAMES)
@pytest.mark.parametrize("resolution", [16, 32])
def test_the_bounding_box_caster_is_its_reference_bit_for_bit(name, resolution):
    vertices, faces = _mesh(name)
    eye = Camera().frame()[0]
    fast = cast_pinhole(vertices, faces, eye, 50.0, resolution)
    slow = cast_pinhole_ref(vertices, faces, eye, 50.0, resolution)
    assert (fast[2] >= 0).any()  # the object is in view
    for a, b in zip(fast, slow, strict=True):
        assert a.tobytes() == b.tobytes()


def test_a_close_eye_and_a_mesh_reaching_behind_it_match_the_reference():
    # A partial scan's pinhole at distance 3, and an eye inside the mesh's bounding sphere: triangles behind
    # the eye are tested against every pixel.
    vertices, faces = _mesh("torus")
    for eye in (np.array([0.0, 0.0, 3.0]), np.array([0.1, -0.2, 0.3])):
        fast = cast_pinhole(vertices, faces, eye, 45.0, 24)
        slow = cast_pinhole_ref(vertices, faces, eye, 45.0, 24)
        for a, b in zip(fast, slow, strict=True):
            assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_the_caster_agrees_with_open3d_embree(name):
    # The caster replaced open3d's RaycastingScene; within Embree's rounding they see the same surface.
    o3d = import_open3d()
    vertices, faces = _mesh(name, 1)
    eye = Camera().frame()[0]
    rays, t_hit, face = cast_pinhole(vertices, faces, eye, 50.0, 32)
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(
        o3d.core.Tensor(np.ascontiguousarray(vertices, dtype=np.float32)),
        o3d.core.Tensor(np.ascontiguousarray(faces, dtype=np.uint32)),
    )
    embree = scene.cast_rays(o3d.core.Tensor(rays))["t_hit"].numpy()
    ours = face >= 0
    assert ours.sum() > 50
    assert (np.isfinite(embree) != ours).sum() <= 2  # a ray grazing an edge may go either way
    both = ours & np.isfinite(embree)
    assert np.abs(embree[both] - t_hit[both]).max() < 1e-5


def test_rays_are_those_of_the_camera():
    camera = Camera()
    rays = camera.rays(8)
    eye = camera.frame()[0]
    assert np.allclose(rays[:, :3], eye, atol=1e-6)
    assert np.allclose(np.linalg.norm(rays[:, 3:], axis=1), 1.0, atol=1e-6)
    assert rays.tobytes() == pinhole_rays(eye, camera.fov_deg, 8).tobytes()


_RENDER_HASH = """
import hashlib, json, sys
import numpy as np
sys.path.insert(0, {repo!r})
from tests.test_render import _mesh
from perception.data.render import Camera, partial_scan, render_depth_normals
digest = hashlib.sha256()
for name in ("sphere", "prism", "torus", "arrow"):
    vertices, faces = _mesh(name)
    for resolution in (16, 32):
        digest.update(render_depth_normals(vertices, faces, Camera(), resolution).tobytes())
    view = np.array([0.6, 0.0, 0.8])
    digest.update(partial_scan(vertices, faces, 64, np.random.default_rng(0), view).tobytes())
umath = np._core._multiarray_umath
print(json.dumps([digest.hexdigest(), [f for f in umath.__cpu_dispatch__ if umath.__cpu_features__[f]]]))
"""


def _render_hash(env: dict[str, str]) -> tuple[str, list[str]]:
    """The digest of a few renders and partial scans made in a fresh process under `env`, and the SIMD
    extensions numpy dispatched to there."""
    code = _RENDER_HASH.format(repo=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    digest, dispatched = json.loads(out.stdout)
    return digest, dispatched


def test_images_are_the_same_bytes_whatever_simd_paths_numpy_and_openblas_take():
    # Embree's reciprocal estimates gave other images on an Intel CPU than on an AMD one. Our caster's
    # arithmetic is IEEE float64 element by element, so numpy's SIMD dispatch (AVX-512, AVX2 or the
    # baseline) and OpenBLAS's kernels must not change a bit.
    native, dispatched = _render_hash({})
    if not dispatched:
        pytest.skip("numpy dispatches to no SIMD extension beyond its baseline on this CPU")
    plain, left = _render_hash(
        {"NPY_DISABLE_CPU_FEATURES": " ".join(dispatched), "OPENBLAS_CORETYPE": "Prescott"}
    )
    assert left == []  # numpy really ran on its baseline only
    assert plain == native
