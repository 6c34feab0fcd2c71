"""Point clouds from files (PLY without faces, PCD, XYZ, PTS, TXT, NPY) and as instances of a dataset.

A robot's data are point clouds: LiDAR or depth-camera object clusters. The parsers are the kept libraries'
(open3d's `read_point_cloud` for PCD, XYZ, PTS and TXT, ASCII or binary; trimesh for PLY, which may hold a
mesh or points only; numpy for NPY); what they read is checked here, and a file that cannot be used raises
`UnusableFile` with a one-line reason, so that a folder keeps every usable file and lists the rest.

`cloud_instance` turns any cloud into the study's instance: centred on its mean and scaled to the unit ball,
`num_points` points drawn without replacement (repeated at random where the cloud has fewer), and a dense
sample of `DENSE_POINTS` for rendering images from points (`perception.data.splat`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from perception._open3d import import_open3d
from perception.data.meshio import MESH_SUFFIXES, UnusableFile, load_mesh
from perception.data.points import Instance, SamplingSpec, instance_rng, mesh_instance
from perception.data.sampling import normalise_points, sample_surface, turn_up

# Read by open3d's read_point_cloud: its format names by suffix (".txt" read as x y z columns).
_OPEN3D_FORMATS = {".pcd": "pcd", ".xyz": "xyz", ".pts": "pts", ".txt": "xyz"}
POINT_SUFFIXES = (*_OPEN3D_FORMATS, ".npy")
GEOMETRY_SUFFIXES = (*MESH_SUFFIXES, *POINT_SUFFIXES)  # what a class/split folder may hold
DENSE_POINTS = 2048  # points kept per instance to render its images from (the benchmarks' own count)


def read_points(path: Path | str) -> np.ndarray:
    """float64[N, 3]: the points of a point file (the first three columns), or raise UnusableFile."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise UnusableFile("empty file")
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UnusableFile(f"unreadable NPY file: {' '.join(str(err).split())[:160]}") from None
        if array.ndim != 2 or array.shape[1] < 3 or array.dtype.kind not in "fiu":
            raise UnusableFile(
                f"NPY array of shape {list(array.shape)} {array.dtype}; expected float[N, >= 3]"
            )
        points = array[:, :3].astype(np.float64)
    elif suffix == ".ply":
        points = _ply_points(path)
    elif suffix in _OPEN3D_FORMATS:
        o3d = import_open3d()
        o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)
        cloud = o3d.io.read_point_cloud(str(path), format=_OPEN3D_FORMATS[suffix])
        points = np.asarray(cloud.points, dtype=np.float64)
    else:
        raise UnusableFile(f"unsupported file type {suffix!r}; allowed: {', '.join(GEOMETRY_SUFFIXES)}")
    if len(points) == 0:
        raise UnusableFile(f"no points: {suffix.lstrip('.').upper()} file unreadable or empty")
    bad = int((~np.isfinite(points)).any(axis=1).sum())
    if bad:
        raise UnusableFile(f"{bad} of {len(points)} points have NaN or infinite coordinates")
    return points


def _ply_points(path: Path) -> np.ndarray:
    import trimesh

    logging.getLogger("trimesh").setLevel(logging.ERROR)
    try:
        loaded = trimesh.load(str(path), file_type="ply", process=False)
    except Exception as err:  # trimesh raises many types for malformed files; all mean the same here
        message = " ".join(str(err).split()) or type(err).__name__
        raise UnusableFile(f"unreadable PLY file: {message[:160]}") from None
    return np.asarray(getattr(loaded, "vertices", np.zeros((0, 3))), dtype=np.float64).reshape(-1, 3)


def read_geometry(path: Path | str, up_axis: str = "z") -> tuple[np.ndarray, np.ndarray | None]:
    """(vertices, faces) of a mesh file, or (points, None) of a point file (a PLY without faces is one),
    turned so that +z is up (`up_axis`); raise UnusableFile with the reason otherwise."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in GEOMETRY_SUFFIXES:
        raise UnusableFile(f"unsupported file type {suffix!r}; allowed: {', '.join(GEOMETRY_SUFFIXES)}")
    if suffix in MESH_SUFFIXES:
        try:
            return load_mesh(path, up_axis)
        except UnusableFile as err:
            if suffix != ".ply" or not str(err).startswith("no faces"):
                raise
    return turn_up(read_points(path), up_axis), None


def _draw(count: int, wanted: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `wanted` of `count` points: without replacement, or every point once and the rest
    drawn again at random where there are fewer."""
    if count >= wanted:
        return rng.choice(count, size=wanted, replace=False)
    return np.concatenate([rng.permutation(count), rng.choice(count, size=wanted - count)])


def cloud_instance(
    points: np.ndarray, spec: SamplingSpec, seed: int, key: tuple[int, ...], dense: int = DENSE_POINTS
) -> Instance:
    """A cloud float[N, 3] (+z up already) as an instance: `spec.num_points` points drawn without
    replacement (repeated where N is smaller: `repeated` is then True), noised as `spec` says, centred on
    their mean and scaled to the unit ball; and `dense` points drawn the same way from the whole cloud,
    normalised alike, to render images from. Partial scans need a mesh: `spec.partial` is refused."""
    if spec.partial:
        raise UnusableFile("points.partial: a partial scan is ray-cast from a mesh; this file holds points")
    rng = instance_rng(seed, key)
    cloud = normalise_points(np.asarray(points, dtype=np.float64))
    chosen = cloud[_draw(len(cloud), spec.num_points, rng)]
    if spec.noise_std > 0:
        chosen = chosen + rng.normal(scale=spec.noise_std, size=chosen.shape)
    return Instance(
        points=normalise_points(chosen).astype(np.float32),
        dense=cloud[_draw(len(cloud), dense, rng)].astype(np.float32),
        repeated=len(cloud) < spec.num_points,
    )


def dense_from_mesh(
    instance: Instance, seed: int, key: tuple[int, ...], dense: int = DENSE_POINTS
) -> Instance:
    """A mesh instance with `dense` points sampled on its surface too, for a dataset whose images are
    rendered from points (some of its files are point clouds: every instance is then rendered alike)."""
    vertices, faces = instance.mesh()
    rng = instance_rng(seed, (*key, 0xDE))  # apart from the draws that made the instance
    surface = sample_surface(vertices.astype(np.float64), faces, dense, rng)
    return Instance(instance.points, instance.vertices, instance.faces, surface.astype(np.float32))


def file_instance(
    path: Path | str, up_axis: str, spec: SamplingSpec, seed: int, key: tuple[int, ...]
) -> Instance:
    """The instance of a mesh or point file (`read_geometry`); raises UnusableFile with the reason."""
    vertices, faces = read_geometry(path, up_axis)
    if faces is None:
        return cloud_instance(vertices, spec, seed, key)
    return mesh_instance(vertices, faces, spec, seed, key)
