"""Point-cloud instances: a mesh (procedural or from a file) normalised, sampled, maybe noised or scanned
(clouds read from point files: `perception.data.clouds`).

Each instance is a pure function of its inputs and a seed key, so instances can be made in any order, in
any process, and still come out byte-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perception.data.render import partial_scan
from perception.data.sampling import normalise_mesh, normalise_points, random_unit_vector, sample_surface
from perception.data.shapes import make_shape


@dataclass(frozen=True)
class SamplingSpec:
    num_points: int = 1024
    noise_std: float = 0.0
    partial: bool = False


@dataclass(frozen=True)
class Instance:
    points: np.ndarray  # float32[N, 3], centred on its mean, farthest point at radius 1
    vertices: np.ndarray | None = None  # float32[V, 3], the normalised mesh the points came from
    faces: np.ndarray | None = None  # int32[F, 3]
    dense: np.ndarray | None = None  # float32[D, 3]: a dense sample to render images from, without a mesh
    repeated: bool = False  # the source cloud had fewer points than asked for: some were drawn twice

    def mesh(self) -> tuple[np.ndarray, np.ndarray]:
        """(vertices, faces) of an instance read from a mesh."""
        if self.vertices is None or self.faces is None:
            raise ValueError("this instance has no mesh: it was read from a point cloud")
        return self.vertices, self.faces

    def dense_points(self) -> np.ndarray:
        """The dense sample images are rendered from."""
        if self.dense is None:
            raise ValueError("this instance has no dense sample: make one with dense_from_mesh")
        return self.dense


def instance_rng(seed: int, key: tuple[int, ...]) -> np.random.Generator:
    """An independent stream per instance: the same (seed, key) gives the same draws in any process."""
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=key))


def mesh_instance(
    vertices: np.ndarray, faces: np.ndarray, spec: SamplingSpec, seed: int, key: tuple[int, ...]
) -> Instance:
    """A mesh (+z up already) normalised and sampled as `spec` says, from the draws of (seed, key)."""
    return _sample(vertices, faces, spec, instance_rng(seed, key))


def _sample(
    vertices: np.ndarray, faces: np.ndarray, spec: SamplingSpec, rng: np.random.Generator
) -> Instance:
    vertices = normalise_mesh(vertices, faces)
    if spec.partial:
        points = partial_scan(vertices, faces, spec.num_points, rng, view=random_unit_vector(rng))
    else:
        points = sample_surface(vertices, faces, spec.num_points, rng)
    if spec.noise_std > 0:
        points = points + rng.normal(scale=spec.noise_std, size=points.shape)
    points = normalise_points(points)
    return Instance(points.astype(np.float32), vertices.astype(np.float32), faces.astype(np.int32))


def procedural_instance(
    class_name: str,
    anisotropy: float,
    spec: SamplingSpec,
    seed: int,
    key: tuple[int, ...],
    deformation: float = 0.0,
) -> Instance:
    """One procedural instance; `deformation` (in [0, 1], see `perception.data.shapes.deform`) 0 gives the
    instances of the generator without deformations, byte for byte."""
    rng = instance_rng(seed, key)
    vertices, faces = make_shape(class_name, rng, anisotropy, deformation)
    return _sample(vertices, faces, spec, rng)
