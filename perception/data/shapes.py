"""Procedural shape classes built from open3d primitives.

Every instance draws its own shape parameters (radii, heights, aspect ratios) and an anisotropic scale, so
that after normalisation to the unit ball the classes differ by shape, not by size.

Canonical pose: **+z is up**. Shapes with an axis (cylinder, cone, capsule, arrow, torus) have it along z;
boxes and polyhedra keep open3d's axis-aligned pose. Scaling is along x, y and z, so the pose stays canonical.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from perception._open3d import import_open3d

Mesh = tuple[np.ndarray, np.ndarray]  # (vertices float64[V, 3], faces int64[F, 3])


def _arrays(mesh) -> Mesh:
    return np.asarray(mesh.vertices, dtype=np.float64).copy(), np.asarray(
        mesh.triangles, dtype=np.int64
    ).copy()


def _box(rng: np.random.Generator) -> Mesh:
    o3d = import_open3d()
    w, h, d = rng.uniform(0.4, 1.6, size=3)
    return _arrays(o3d.geometry.TriangleMesh.create_box(w, h, d))


def _sphere(rng: np.random.Generator) -> Mesh:
    # The anisotropic scale applied afterwards makes it an ellipsoid.
    o3d = import_open3d()
    return _arrays(o3d.geometry.TriangleMesh.create_sphere(1.0, resolution=16))


def _cylinder(rng: np.random.Generator) -> Mesh:
    o3d = import_open3d()
    radius, height = rng.uniform(0.3, 0.7), rng.uniform(0.9, 2.2)
    return _arrays(o3d.geometry.TriangleMesh.create_cylinder(radius, height, resolution=32, split=4))


def _cone(rng: np.random.Generator) -> Mesh:
    o3d = import_open3d()
    radius, height = rng.uniform(0.4, 0.8), rng.uniform(0.8, 2.0)
    return _arrays(o3d.geometry.TriangleMesh.create_cone(radius, height, resolution=32, split=4))


def _torus(rng: np.random.Generator) -> Mesh:
    o3d = import_open3d()
    tube = rng.uniform(0.15, 0.45)
    return _arrays(
        o3d.geometry.TriangleMesh.create_torus(1.0, tube, radial_resolution=32, tubular_resolution=16)
    )


def _tetrahedron(rng: np.random.Generator) -> Mesh:
    return _arrays(import_open3d().geometry.TriangleMesh.create_tetrahedron(1.0))


def _octahedron(rng: np.random.Generator) -> Mesh:
    return _arrays(import_open3d().geometry.TriangleMesh.create_octahedron(1.0))


def _icosahedron(rng: np.random.Generator) -> Mesh:
    return _arrays(import_open3d().geometry.TriangleMesh.create_icosahedron(1.0))


def _capsule(rng: np.random.Generator) -> Mesh:
    # A sphere cut at its equator and pulled apart along z: two hemispheres joined by a cylinder, one surface.
    o3d = import_open3d()
    radius, length = rng.uniform(0.3, 0.6), rng.uniform(0.6, 1.6)
    vertices, faces = _arrays(o3d.geometry.TriangleMesh.create_sphere(radius, resolution=16))
    upper = vertices[:, 2] >= -1e-12  # the equator ring goes up; the band below it becomes the cylinder
    vertices[:, 2] += np.where(upper, length / 2, -length / 2)
    return vertices, faces


def _arrow(rng: np.random.Generator) -> Mesh:
    o3d = import_open3d()
    shaft_radius = rng.uniform(0.06, 0.14)
    head_radius = rng.uniform(0.2, 0.35)
    shaft_height, head_height = rng.uniform(0.8, 1.4), rng.uniform(0.3, 0.6)
    mesh = o3d.geometry.TriangleMesh.create_arrow(
        shaft_radius, head_radius, shaft_height, head_height, resolution=24, cylinder_split=4, cone_split=2
    )
    return _arrays(mesh)


SHAPE_BUILDERS: dict[str, Callable[[np.random.Generator], Mesh]] = {
    "box": _box,
    "sphere": _sphere,
    "cylinder": _cylinder,
    "cone": _cone,
    "torus": _torus,
    "tetrahedron": _tetrahedron,
    "octahedron": _octahedron,
    "icosahedron": _icosahedron,
    "capsule": _capsule,
    "arrow": _arrow,
}
SHAPE_NAMES: tuple[str, ...] = tuple(SHAPE_BUILDERS)


def make_shape(name: str, rng: np.random.Generator, anisotropy: float) -> Mesh:
    """One random instance of class `name`, scaled along x, y, z by factors in [1 - a, 1 + a]."""
    if name not in SHAPE_BUILDERS:
        raise ValueError(f"unknown shape class {name!r}; allowed: {', '.join(SHAPE_NAMES)}")
    vertices, faces = SHAPE_BUILDERS[name](rng)
    scale = rng.uniform(1.0 - anisotropy, 1.0 + anisotropy, size=3)
    return vertices * scale, faces
