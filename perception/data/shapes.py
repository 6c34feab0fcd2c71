"""Procedural shape classes built from open3d primitives.

Every instance draws its own shape parameters (radii, heights, aspect ratios, roundness, number of sides) and
an anisotropic scale, so that after normalisation to the unit ball the classes differ by shape, not by size.
With `deformation > 0` every instance is also tapered, twisted about z and bent by its own random amounts (see
`deform`): variety within each class, so that classes whose families come close (cylinder and prism, cone and
pyramid, box and rounded box, sphere and icosahedron) must be told apart by their defining features.

Canonical pose: **+z is up**. Shapes with an axis (cylinder, prism, cone, pyramid, capsule, arrow, torus) have
it along z; cones, pyramids and arrows point to +z; boxes and polyhedra keep open3d's axis-aligned pose.
Scaling is along x, y and z, and the deformations keep z as the axis, so the pose stays canonical.
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


def _pyramid(rng: np.random.Generator) -> Mesh:
    # A square base (corners on the x and y axes) and an apex on +z: open3d's cone with 4 sides.
    o3d = import_open3d()
    radius, height = rng.uniform(0.4, 0.8), rng.uniform(0.8, 2.0)
    return _arrays(o3d.geometry.TriangleMesh.create_cone(radius, height, resolution=4, split=4))


def _prism(rng: np.random.Generator) -> Mesh:
    # A right prism on a regular 5-, 6- or 8-gon, axis along z: open3d's cylinder with few sides.
    o3d = import_open3d()
    sides = int(rng.choice([5, 6, 8]))
    radius, height = rng.uniform(0.3, 0.7), rng.uniform(0.9, 2.2)
    return _arrays(o3d.geometry.TriangleMesh.create_cylinder(radius, height, resolution=sides, split=4))


def _rounded_box(rng: np.random.Generator) -> Mesh:
    # A superellipsoid |x|^(2/e) + |y|^(2/e) + |z|^(2/e) = 1 with e in [0.25, 0.6]: between a box (e -> 0) and
    # a sphere (e = 1). Each unit-sphere vertex u maps to sign(u) |u|^e, which lies on that surface.
    o3d = import_open3d()
    roundness = rng.uniform(0.25, 0.6)
    vertices, faces = _arrays(o3d.geometry.TriangleMesh.create_sphere(1.0, resolution=20))
    vertices = np.sign(vertices) * np.abs(vertices) ** roundness
    return vertices * rng.uniform(0.4, 1.6, size=3), faces


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
    "pyramid": _pyramid,
    "prism": _prism,
    "rounded_box": _rounded_box,
}
SHAPE_NAMES: tuple[str, ...] = tuple(SHAPE_BUILDERS)


MAX_EDGE = 0.15  # deformed meshes are subdivided until no edge is longer than this share of their radius,
MAX_FACES = 500  # or until they have at least this many faces (long thin triangles would go on splitting)


def subdivide(vertices: np.ndarray, faces: np.ndarray) -> Mesh:
    """Midpoint subdivision: every triangle into four, sharing each edge's midpoint between its two faces."""
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])  # (3F, 2)
    unique, inverse = np.unique(np.sort(edges, axis=1), axis=0, return_inverse=True)
    mids = len(vertices) + inverse.reshape(3, -1).T  # (F, 3): midpoints of edges 01, 12, 20
    a, b, c = faces.T
    ab, bc, ca = mids.T
    new_faces = np.stack([[a, ab, ca], [ab, b, bc], [ca, bc, c], [ab, bc, ca]]).transpose(2, 0, 1)
    midpoints = vertices[unique].mean(axis=1)  # (E, 3)
    return np.concatenate([vertices, midpoints]), new_faces.reshape(-1, 3)


def _fine(vertices: np.ndarray, faces: np.ndarray) -> Mesh:
    """Subdivide until every edge is shorter than MAX_EDGE of the mesh's radius (or there are MAX_FACES
    faces), so that bends and twists bend the surface rather than only move its corners."""
    radius = np.linalg.norm(vertices - vertices.mean(axis=0), axis=1).max()
    while len(faces) < MAX_FACES:
        a, b, c = (vertices[faces[:, k]] for k in range(3))
        longest = np.sqrt(np.max([((a - b) ** 2).sum(1), ((b - c) ** 2).sum(1), ((c - a) ** 2).sum(1)]))
        if longest <= MAX_EDGE * radius:
            break
        vertices, faces = subdivide(vertices, faces)
    return vertices, faces


def deform(vertices: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Taper, twist and bend about the z axis by random amounts that scale with `strength` in [0, 1].

    With t = z mapped to [-1, 1] over the shape's height, in this order:
    - taper: x and y scaled by 1 + tau * t, tau ~ U(-0.5, 0.5) * strength (a cylinder becomes a frustum);
    - twist: x and y turned about z by phi * t, phi ~ U(-pi/4, pi/4) * strength;
    - bend: x and y shifted by beta * h * t^2 along a random horizontal direction, beta ~ U(-0.4, 0.4) *
      strength, h the half-height: the axis becomes a parabola, still running from bottom to top along z.
    """
    tau, phi, beta = rng.uniform(-1.0, 1.0, size=3) * strength * np.array([0.5, np.pi / 4, 0.4])
    direction = rng.uniform(0.0, 2 * np.pi)
    z = vertices[:, 2]
    half = (z.max() - z.min()) / 2
    t = (z - (z.max() + z.min()) / 2) / max(half, 1e-12)  # in [-1, 1]
    xy = vertices[:, :2] * (1.0 + tau * t)[:, None]
    cos, sin = np.cos(phi * t), np.sin(phi * t)
    xy = np.stack([cos * xy[:, 0] - sin * xy[:, 1], sin * xy[:, 0] + cos * xy[:, 1]], axis=1)
    xy = xy + (beta * half * t**2)[:, None] * np.array([np.cos(direction), np.sin(direction)])
    return np.concatenate([xy, z[:, None]], axis=1)


def make_shape(name: str, rng: np.random.Generator, anisotropy: float, deformation: float = 0.0) -> Mesh:
    """One random instance of class `name`, scaled along x, y, z by factors in [1 - a, 1 + a], then (when
    `deformation` > 0) subdivided and deformed by `deform`. `deformation = 0` draws nothing more: instances
    are then exactly those of the generator without deformations."""
    if name not in SHAPE_BUILDERS:
        raise ValueError(f"unknown shape class {name!r}; allowed: {', '.join(SHAPE_NAMES)}")
    if not 0.0 <= deformation <= 1.0:
        raise ValueError(f"deformation = {deformation!r} is not allowed: expected a number in [0, 1]")
    vertices, faces = SHAPE_BUILDERS[name](rng)
    scale = rng.uniform(1.0 - anisotropy, 1.0 + anisotropy, size=3)
    vertices = vertices * scale
    if deformation > 0:
        vertices, faces = _fine(vertices, faces)
        vertices = deform(vertices, rng, deformation)
    return vertices, faces
