"""Reading real meshes (OFF, OBJ, PLY, STL; ASCII or binary) and deciding whether each one is usable
(point files: `perception.data.clouds`).

trimesh reads the files: it handles the ModelNet header quirk (`OFF8 6 12` on one line), polygon faces
(triangulated as fans), negative OBJ indices and several bodies in one file, where open3d's reader silently
returns an empty mesh for some of them. What trimesh reads is then checked here: a file that cannot be
sampled raises `UnusableFile` with a one-line reason, so that a dataset keeps every usable file and lists
the rest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from perception.data.sampling import triangle_areas, turn_up

MESH_SUFFIXES = (".off", ".obj", ".ply", ".stl")


class UnusableFile(Exception):
    """A mesh or point file that cannot be used; str(err) is the reason, one line."""


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(vertices float64[V, 3], faces int64[F, 3]) of every body in the file; faces empty for point files."""
    import trimesh

    logging.getLogger("trimesh").setLevel(logging.ERROR)
    kind = path.suffix.lower().lstrip(".")
    try:
        loaded = trimesh.load(str(path), file_type=kind, process=False)
    except Exception as err:  # trimesh raises many types for malformed files; all mean the same here
        message = " ".join(str(err).split()) or type(err).__name__
        raise UnusableFile(f"unreadable {kind.upper()} file: {message[:160]}") from None
    # A file with several bodies loads as a Scene; dump() applies each body's transform.
    # Each is a Trimesh or a PointCloud; both have vertices.
    geometries: list[Any] = loaded.dump() if isinstance(loaded, trimesh.Scene) else [loaded]
    vertices, faces, offset = [], [], 0
    for geometry in geometries:
        v = np.asarray(geometry.vertices, dtype=np.float64).reshape(-1, 3)
        if isinstance(geometry, trimesh.Trimesh):
            faces.append(np.asarray(geometry.faces, dtype=np.int64).reshape(-1, 3) + offset)
        vertices.append(v)
        offset += len(v)
    if not vertices:
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    return np.concatenate(vertices), np.concatenate(faces) if faces else np.zeros((0, 3), dtype=np.int64)


def load_mesh(path: Path | str, up_axis: str = "z") -> tuple[np.ndarray, np.ndarray]:
    """Read one mesh file as (vertices float64[V, 3], faces int64[F, 3]) with +z up, or raise UnusableFile.

    `up_axis="y"` turns a y-up mesh by +90 degrees about x so that its up direction becomes +z.
    """
    path = Path(path)
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise UnusableFile(f"unsupported file type {path.suffix!r}; allowed: {', '.join(MESH_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise UnusableFile("empty file")
    vertices, faces = _read(path)
    if len(vertices) == 0:
        raise UnusableFile("no vertices: the file holds no geometry")
    if len(faces) == 0:
        raise UnusableFile(f"no faces: {len(vertices)} points or line vertices only, no surface to sample")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise UnusableFile(f"face indices outside 0..{len(vertices) - 1}")
    used = np.unique(faces)
    if not np.isfinite(vertices[used]).all():
        bad = int((~np.isfinite(vertices[used])).any(axis=1).sum())
        raise UnusableFile(f"{bad} vertices used by faces are NaN or infinite")
    areas = triangle_areas(vertices, faces)
    if not areas.sum() > 0:
        raise UnusableFile("zero surface area: every face is degenerate")
    faces = faces[areas > 0]
    return turn_up(vertices, up_axis), faces


def list_mesh_files(folder: Path) -> list[Path]:
    """Every file in `folder` (not recursive), sorted by name so that order and seeds are reproducible."""
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")), key=lambda p: p.name
    )
