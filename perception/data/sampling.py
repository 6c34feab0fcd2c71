"""Surface sampling and normalisation: pure numpy, seeded by the caller's Generator, so byte-reproducible."""

from __future__ import annotations

import numpy as np


def triangle_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """float64[F]: the area of every triangle."""
    a, b, c = (vertices[faces[:, k]] for k in range(3))  # each (F, 3)
    return 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)


def normalise_mesh(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Centre on the surface's area-weighted centroid and scale so the farthest used vertex is at radius 1.

    Every point sampled on the surface then lies in the unit ball (a triangle lies in the ball that holds its
    corners). Vertices no face uses are ignored, as they are not part of the surface.
    """
    areas = triangle_areas(vertices, faces)
    centroids = vertices[faces].mean(axis=1)  # (F, 3)
    centre = (areas[:, None] * centroids).sum(axis=0) / areas.sum()
    centred = vertices - centre
    radius = np.linalg.norm(centred[np.unique(faces)], axis=1).max()
    return centred / radius


def sample_surface(vertices: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """float64[n, 3]: points uniform over the surface area (triangle by area, then uniform barycentrics)."""
    areas = triangle_areas(vertices, faces)
    chosen = rng.choice(len(faces), size=n, p=areas / areas.sum())
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1.0  # reflect into the triangle instead of rejecting, so every draw is used
    u[flip], v[flip] = 1.0 - u[flip], 1.0 - v[flip]
    a, b, c = (vertices[faces[chosen, k]] for k in range(3))  # each (n, 3)
    return a + u[:, None] * (b - a) + v[:, None] * (c - a)


def normalise_points(points: np.ndarray) -> np.ndarray:
    """Centre a cloud on its mean and scale its farthest point to radius 1."""
    centred = points - points.mean(axis=0)
    return centred / np.linalg.norm(centred, axis=1).max()


def random_unit_vector(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def turn_up(points: np.ndarray, up_axis: str) -> np.ndarray:
    """float[N, 3] with +z up: `up_axis="y"` turns y-up data by +90 degrees about x (old +y becomes +z);
    "z" leaves them as they are."""
    if up_axis == "z":
        return points
    if up_axis != "y":
        raise ValueError(f"up_axis {up_axis!r} is not one of z, y")
    # (x, y, z) -> (x, -z, y): rotation by +90 degrees about x, so old +y becomes +z.
    return np.stack([points[:, 0], -points[:, 2], points[:, 1]], axis=1)
