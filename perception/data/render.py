"""CPU ray casting with open3d's RaycastingScene: depth + surface-normal images and partial scans.

No display and no GPU are needed. A `Camera` is a pinhole looking at the origin from a direction given by
azimuth and elevation, with +z up. Images have 4 channels, float32[4, H, W]:

- channel 0, depth: `(distance + 1 - z) / 2`, where z is the depth along the optical axis. A surface in the
  unit ball maps into [0, 1] (nearer is brighter); background is 0.
- channels 1-3, normal: the unit surface normal in the camera frame (x right, y up, z towards the camera),
  turned to face the camera, as a depth sensor's normal estimate would be; background is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perception._open3d import import_open3d


@dataclass(frozen=True)
class Camera:
    distance: float = 2.5
    azimuth_deg: float = -60.0
    elevation_deg: float = 25.0
    fov_deg: float = 50.0

    def frame(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(eye, right, up, forward): the camera position and its orthonormal axes in world coordinates."""
        az, el = np.radians(self.azimuth_deg), np.radians(self.elevation_deg)
        eye = self.distance * np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
        return (eye, *_look_at(eye))

    def rays(self, resolution: int) -> np.ndarray:
        """float32[H*W, 6]: origin and unit direction of the ray through each pixel centre, row-major."""
        return pinhole_rays(self.frame()[0], self.fov_deg, resolution)


def _look_at(eye: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    forward = -eye / np.linalg.norm(eye)
    world_up = np.array([0.0, 0.0, 1.0])
    if abs(forward @ world_up) > 0.999:  # looking straight down or up: any horizontal right axis will do
        world_up = np.array([0.0, 1.0, 0.0])
    right = np.cross(forward, world_up)
    right /= np.linalg.norm(right)
    return right, np.cross(right, forward), forward


def pinhole_rays(eye: np.ndarray, fov_deg: float, resolution: int) -> np.ndarray:
    """float32[H*W, 6]: rays of a square pinhole at `eye` looking at the origin, +z up, row 0 at the top."""
    right, up, forward = _look_at(eye)
    half = np.tan(np.radians(fov_deg) / 2)
    steps = (np.arange(resolution) + 0.5) / resolution * 2 - 1  # pixel centres in [-1, 1]
    x, y = np.meshgrid(steps * half, -steps * half)  # each (H, W)
    directions = forward + x[..., None] * right + y[..., None] * up  # (H, W, 3)
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    origins = np.broadcast_to(eye, directions.shape)
    return np.concatenate([origins, directions], axis=-1).reshape(-1, 6).astype(np.float32)


def _cast(vertices: np.ndarray, faces: np.ndarray, rays: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(t_hit float32[R], face normals float32[R, 3]); t_hit is inf where a ray misses."""
    o3d = import_open3d()
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(
        o3d.core.Tensor(np.ascontiguousarray(vertices, dtype=np.float32)),
        o3d.core.Tensor(np.ascontiguousarray(faces, dtype=np.uint32)),
    )
    hits = scene.cast_rays(o3d.core.Tensor(rays))
    return hits["t_hit"].numpy(), hits["primitive_normals"].numpy()


def render_depth_normals(
    vertices: np.ndarray, faces: np.ndarray, camera: Camera, resolution: int
) -> np.ndarray:
    """float32[4, H, W] (H = W = resolution): depth and camera-frame normals of a mesh in the unit ball."""
    rays = camera.rays(resolution)
    t_hit, normals = _cast(vertices, faces, rays)
    hit = np.isfinite(t_hit)
    _, right, up, forward = camera.frame()
    directions = rays[:, 3:].astype(np.float64)
    z = np.where(hit, t_hit, 0.0) * (directions @ forward)  # depth along the optical axis
    depth = np.where(hit, (camera.distance + 1.0 - z) / 2.0, 0.0)
    normals = normals.astype(np.float64)
    facing_away = (normals * directions).sum(axis=1) > 0  # winding of real meshes is not to be trusted
    normals[facing_away] *= -1
    camera_normals = np.stack([normals @ right, normals @ up, normals @ -forward], axis=1)  # (R, 3)
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
    rays = pinhole_rays(3.0 * view, 45.0, resolution)
    t_hit, _ = _cast(vertices, faces, rays)
    hit = np.isfinite(t_hit)
    if not hit.any():
        raise ValueError("the partial scan saw nothing: is the mesh inside the unit ball?")
    points = rays[hit, :3].astype(np.float64) + t_hit[hit, None] * rays[hit, 3:].astype(np.float64)
    chosen = rng.choice(len(points), size=n, replace=len(points) < n)
    return points[chosen]
