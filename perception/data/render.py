"""CPU ray casting in float64: depth + surface-normal images and partial scans, the same bytes on every CPU.

No display and no GPU are needed. A `Camera` is a pinhole looking at the origin from a direction given by
azimuth and elevation, with +z up. Images have 4 channels, float32[4, H, W]:

- channel 0, depth: `(distance + 1 - z) / 2`, where z is the depth along the optical axis. A surface in the
  unit ball maps into [0, 1] (nearer is brighter); background is 0.
- channels 1-3, normal: the unit surface normal in the camera frame (x right, y up, z towards the camera),
  turned to face the camera, as a depth sensor's normal estimate would be; background is 0.

Why our own caster rather than open3d's `RaycastingScene`: Embree, under it, intersects with approximate
reciprocals whose last bits are the CPU's own, so the same mesh rendered on an Intel and an AMD CPU gave
other images (a default study's `prepare_images` output differed in every file). Here every hit is
Moller-Trumbore in float64, element by element (no BLAS, no reductions, no transcendental functions beyond
the camera's, taken from `math`): IEEE arithmetic, the same on every machine. `cast_pinhole` finds the
candidate (pixel, triangle) pairs from each triangle's projected bounding box; `cast_pinhole_ref`, its slow
reference, tests every ray against every triangle, and a test checks that they agree bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Camera:
    distance: float = 2.5
    azimuth_deg: float = -60.0
    elevation_deg: float = 25.0
    fov_deg: float = 50.0

    def frame(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(eye, right, up, forward): the camera position and its orthonormal axes in world coordinates."""
        az, el = math.radians(self.azimuth_deg), math.radians(self.elevation_deg)
        eye = self.distance * np.array(
            [math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)]
        )
        return (eye, *_look_at(eye))

    def rays(self, resolution: int) -> np.ndarray:
        """float32[H*W, 6]: origin and unit direction of the ray through each pixel centre, row-major."""
        return pinhole_rays(self.frame()[0], self.fov_deg, resolution)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a . b over the last axis (3), as three products and two sums in this order: the same bits anywhere."""
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.stack(
        [
            a[..., 1] * b[..., 2] - a[..., 2] * b[..., 1],
            a[..., 2] * b[..., 0] - a[..., 0] * b[..., 2],
            a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0],
        ],
        axis=-1,
    )


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.sqrt(_dot(a, a))[..., None]


def _look_at(eye: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    forward = _unit(-np.asarray(eye, dtype=np.float64))
    world_up = np.array([0.0, 0.0, 1.0])
    if abs(float(_dot(forward, world_up))) > 0.999:  # looking straight down or up: any horizontal right axis
        world_up = np.array([0.0, 1.0, 0.0])
    right = _unit(_cross(forward, world_up))
    return right, _cross(right, forward), forward


def half_width(fov_deg: float) -> float:
    """tan(fov / 2), the image plane's half-width at depth 1: from `math`, as all of the camera's trig is."""
    return math.tan(math.radians(fov_deg) / 2)


def pinhole_rays(eye: np.ndarray, fov_deg: float, resolution: int) -> np.ndarray:
    """float32[H*W, 6]: rays of a square pinhole at `eye` looking at the origin, +z up, row 0 at the top."""
    return _pinhole_rays(eye, _look_at(eye), half_width(fov_deg), resolution)


def _pinhole_rays(
    eye: np.ndarray, axes: tuple[np.ndarray, np.ndarray, np.ndarray], half: float, resolution: int
) -> np.ndarray:
    """`pinhole_rays` from the camera's axes (right, up, forward) and `half_width`, which its caller has."""
    right, up, forward = axes
    steps = ((np.arange(resolution) + 0.5) / resolution * 2 - 1) * half  # (W,): pixel centres, left to right
    x, y = np.meshgrid(steps, -steps)  # each (H, W)
    directions = _unit(forward + x[..., None] * right + y[..., None] * up)  # (H, W, 3)
    origins = np.broadcast_to(np.asarray(eye, dtype=np.float64), directions.shape)
    return np.concatenate([origins, directions], axis=-1).reshape(-1, 6).astype(np.float32)


def _ray_triangle(
    origins: np.ndarray, directions: np.ndarray, v0: np.ndarray, v1: np.ndarray, v2: np.ndarray
) -> np.ndarray:
    """float64[...]: the distance along each ray to its triangle (Moller-Trumbore), inf where it misses;
    every argument float64[..., 3], broadcast together."""
    edge1, edge2 = v1 - v0, v2 - v0
    p = _cross(directions, edge2)
    det = _dot(edge1, p)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / det
        s = origins - v0
        u = _dot(s, p) * inv
        q = _cross(s, edge1)
        v = _dot(directions, q) * inv
        t = _dot(edge2, q) * inv
        hit = (det != 0) & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0)
    return np.where(hit, t, np.inf)


def _nearest(
    pixels: np.ndarray, faces: np.ndarray, t: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """(t float64[count], face int64[count]): for every pixel, the nearest hit among the (pixel, face, t)
    triples, ties to the lower face index; inf and -1 where nothing hits."""
    t_hit, face = np.full(count, np.inf), np.full(count, -1, dtype=np.int64)
    hit = np.isfinite(t)
    pixels, faces, t = pixels[hit], faces[hit], t[hit]
    order = np.lexsort((faces, t, pixels))  # by pixel, then distance, then face
    first = np.unique(pixels[order], return_index=True)[1]
    chosen = order[first]
    t_hit[pixels[chosen]], face[pixels[chosen]] = t[chosen], faces[chosen]
    return t_hit, face


def cast_pinhole(
    vertices: np.ndarray, faces: np.ndarray, eye: np.ndarray, fov_deg: float, resolution: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rays float32[H*W, 6] as `pinhole_rays` makes them, t_hit float64[H*W] (inf: a miss), the hit face
    int64[H*W] (-1)). Each triangle is tested only against the pixel centres inside its projected bounding
    box, grown by a margin far above any rounding; the test itself is `_ray_triangle`'s, on the float32
    rays."""
    right, up, forward = axes = _look_at(eye)
    half = half_width(fov_deg)
    rays = _pinhole_rays(eye, axes, half, resolution)
    origins, directions = rays[:, :3].astype(np.float64), rays[:, 3:].astype(np.float64)
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    relative = vertices - np.asarray(eye, dtype=np.float64)  # (V, 3)
    ahead = _dot(relative, forward)  # (V,): > 0 in front of the camera
    with np.errstate(divide="ignore", invalid="ignore"):
        column = (_dot(relative, right) / ahead / half + 1) / 2 * resolution - 0.5  # (V,)
        row = (1 - _dot(relative, up) / ahead / half) / 2 * resolution - 0.5  # (V,)
    margin = 0.05  # pixels; the projection's rounding is ~1e-9 of one
    corners_col, corners_row = column[faces], row[faces]  # each (F, 3)
    behind = (ahead[faces] <= 1e-9).any(axis=1)  # a triangle reaching behind the eye: test every pixel
    lo_col = np.where(behind, 0, np.ceil(corners_col.min(axis=1) - margin))
    hi_col = np.where(behind, resolution - 1, np.floor(corners_col.max(axis=1) + margin))
    lo_row = np.where(behind, 0, np.ceil(corners_row.min(axis=1) - margin))
    hi_row = np.where(behind, resolution - 1, np.floor(corners_row.max(axis=1) + margin))
    lo_col, lo_row = np.clip(lo_col, 0, resolution), np.clip(lo_row, 0, resolution)
    hi_col, hi_row = np.clip(hi_col, -1, resolution - 1), np.clip(hi_row, -1, resolution - 1)
    widths = np.maximum(hi_col - lo_col + 1, 0).astype(np.int64)  # (F,)
    heights = np.maximum(hi_row - lo_row + 1, 0).astype(np.int64)
    counts = widths * heights
    pair_face = np.repeat(np.arange(len(faces)), counts)  # (P,): one entry per (triangle, candidate pixel)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)  # index in its box
    pair_width = widths[pair_face]
    pair_row = lo_row[pair_face].astype(np.int64) + within // pair_width
    pair_col = lo_col[pair_face].astype(np.int64) + within % pair_width
    pair_pixel = pair_row * resolution + pair_col
    triangle = vertices[faces[pair_face]]  # (P, 3, 3)
    t = _ray_triangle(
        origins[pair_pixel], directions[pair_pixel], triangle[:, 0], triangle[:, 1], triangle[:, 2]
    )
    t_hit, face = _nearest(pair_pixel, pair_face, t, len(rays))
    return rays, t_hit, face


def cast_pinhole_ref(
    vertices: np.ndarray, faces: np.ndarray, eye: np.ndarray, fov_deg: float, resolution: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`cast_pinhole`'s slow reference: every ray against every triangle."""
    rays = pinhole_rays(eye, fov_deg, resolution)
    origins, directions = rays[:, :3].astype(np.float64), rays[:, 3:].astype(np.float64)
    triangle = np.asarray(vertices, dtype=np.float64)[np.asarray(faces, dtype=np.int64)]  # (F, 3, 3)
    corners = triangle[None, :, 0], triangle[None, :, 1], triangle[None, :, 2]  # each (1, F, 3)
    t = _ray_triangle(origins[:, None], directions[:, None], *corners)  # (R, F)
    pixels = np.repeat(np.arange(len(rays)), len(triangle))
    faces_of_pairs = np.tile(np.arange(len(triangle)), len(rays))
    t_hit, face = _nearest(pixels, faces_of_pairs, t.reshape(-1), len(rays))
    return rays, t_hit, face


def face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """float64[F, 3]: each triangle's unit normal, (v1 - v0) x (v2 - v0) normalised (0 where degenerate)."""
    triangle = np.asarray(vertices, dtype=np.float64)[np.asarray(faces, dtype=np.int64)]
    normal = _cross(triangle[:, 1] - triangle[:, 0], triangle[:, 2] - triangle[:, 0])
    length = np.sqrt(_dot(normal, normal))
    return np.divide(normal, length[:, None], out=np.zeros_like(normal), where=length[:, None] > 0)


def render_depth_normals(
    vertices: np.ndarray, faces: np.ndarray, camera: Camera, resolution: int
) -> np.ndarray:
    """float32[4, H, W] (H = W = resolution): depth and camera-frame normals of a mesh in the unit ball."""
    eye, right, up, forward = camera.frame()
    rays, t_hit, face = cast_pinhole(vertices, faces, eye, camera.fov_deg, resolution)
    hit = face >= 0
    directions = rays[:, 3:].astype(np.float64)
    z = np.where(hit, t_hit, 0.0) * _dot(directions, forward)  # depth along the optical axis
    depth = np.where(hit, (camera.distance + 1.0 - z) / 2.0, 0.0)
    normals = face_normals(vertices, faces)[np.maximum(face, 0)]  # (R, 3)
    facing_away = _dot(normals, directions) > 0  # winding of real meshes is not to be trusted
    normals[facing_away] *= -1
    camera_normals = np.stack([_dot(normals, right), _dot(normals, up), -_dot(normals, forward)], axis=1)
    camera_normals[~hit] = 0.0
    image = np.concatenate([depth[:, None], camera_normals], axis=1)  # (R, 4)
    return image.T.reshape(4, resolution, resolution).astype(np.float32)


def partial_scan(
    vertices: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator, view: np.ndarray
) -> np.ndarray:
    """float64[n, 3]: surface points seen from direction `view` (a unit vector), n of them drawn at random.

    Rays are cast from a pinhole at distance 3 that sees the whole unit ball, on a grid dense enough to give
    several hits per point asked for; if there are fewer hits than n, hits are drawn with replacement.
    """
    resolution = int(np.ceil(np.sqrt(8 * n))) + 16
    eye = 3.0 * np.asarray(view, dtype=np.float64)
    rays, t_hit, face = cast_pinhole(vertices, faces, eye, 45.0, resolution)
    hit = face >= 0
    if not hit.any():
        raise ValueError("the partial scan saw nothing: is the mesh inside the unit ball?")
    points = rays[hit, :3].astype(np.float64) + t_hit[hit, None] * rays[hit, 3:].astype(np.float64)
    chosen = rng.choice(len(points), size=n, replace=len(points) < n)
    return points[chosen]
