"""Real mesh files are messy: every usable one loads, every unusable one is refused with its reason."""

from __future__ import annotations

import numpy as np
import pytest

from perception.data.meshio import UnusableFile, load_mesh
from perception.data.sampling import triangle_areas
from tests.conftest import (
    CUBE_QUADS,
    CUBE_TRIANGLES,
    CUBE_VERTICES,
    off_text,
    ply_ascii_points,
    ply_binary,
    stl_ascii,
    stl_binary,
)

CUBE_TRIS_XYZ = CUBE_VERTICES[CUBE_TRIANGLES]  # (12, 3, 3)


def _write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _cube_area_ok(vertices, faces, bodies=1):
    assert np.isclose(triangle_areas(vertices, faces).sum(), 6.0 * bodies)


USABLE = {
    "cube.off": lambda: off_text(CUBE_VERTICES, CUBE_QUADS),
    # ModelNet's header quirk: counts on the OFF line itself.
    "quirk.off": lambda: off_text(CUBE_VERTICES, CUBE_QUADS, quirk=True),
    "comments.off": lambda: (
        "OFF\n# a comment\n\n" + off_text(CUBE_VERTICES, CUBE_QUADS)[4:].replace("\n", "\n\n", 1)
    ),
    "quads.obj": lambda: (
        "".join(f"v {x} {y} {z}\n" for x, y, z in CUBE_VERTICES)
        + "".join("f " + " ".join(str(i + 1) for i in q) + "\n" for q in CUBE_QUADS)
    ),
    "negative.obj": lambda: (
        "".join(f"v {x} {y} {z}\n" for x, y, z in CUBE_VERTICES)
        + "".join("f " + " ".join(str(i - 8) for i in q) + "\n" for q in CUBE_QUADS)
    ),
    "ascii.stl": lambda: stl_ascii(CUBE_TRIS_XYZ),
    "binary.stl": lambda: stl_binary(CUBE_TRIS_XYZ),
    "binary.ply": lambda: ply_binary(CUBE_VERTICES, CUBE_TRIANGLES),
    "UPPER.STL": lambda: stl_binary(CUBE_TRIS_XYZ),
}


@pytest.mark.parametrize("name", USABLE)
def test_usable_formats_load_as_the_same_cube(tmp_path, name):
    vertices, faces = load_mesh(_write(tmp_path, name, USABLE[name]()))
    assert faces.shape[1] == 3 and len(faces) == 12  # quads triangulated
    _cube_area_ok(vertices, faces)


def test_pentagon_faces_are_triangulated(tmp_path):
    pentagon = np.array([[np.cos(a), np.sin(a), 0.0] for a in np.linspace(0, 2 * np.pi, 6)[:-1]])
    text = "".join(f"v {x} {y} {z}\n" for x, y, z in pentagon) + "f 1 2 3 4 5\n"
    vertices, faces = load_mesh(_write(tmp_path, "pentagon.obj", text))
    assert len(faces) == 3
    assert np.isclose(triangle_areas(vertices, faces).sum(), 2.5 * np.sin(2 * np.pi / 5))


def test_several_bodies_in_one_file_are_all_kept(tmp_path):
    shifted = CUBE_TRIS_XYZ + np.array([3.0, 0, 0])
    vertices, faces = load_mesh(
        _write(tmp_path, "two.stl", stl_ascii(CUBE_TRIS_XYZ, "a") + stl_ascii(shifted, "b"))
    )
    _cube_area_ok(vertices, faces, bodies=2)
    text = "o first\n" + "".join(f"v {x} {y} {z}\n" for x, y, z in CUBE_VERTICES)
    text += "".join("f " + " ".join(str(i + 1) for i in q) + "\n" for q in CUBE_QUADS)
    text += "o second\n" + "".join(f"v {x + 3} {y} {z}\n" for x, y, z in CUBE_VERTICES)
    text += "".join("f " + " ".join(str(i + 9) for i in q) + "\n" for q in CUBE_QUADS)
    vertices, faces = load_mesh(_write(tmp_path, "two.obj", text))
    _cube_area_ok(vertices, faces, bodies=2)


def test_y_up_meshes_are_turned_to_z_up(tmp_path):
    tall_in_y = CUBE_VERTICES * np.array([1.0, 5.0, 1.0])
    vertices, _ = load_mesh(_write(tmp_path, "tall.off", off_text(tall_in_y, CUBE_QUADS)), up_axis="y")
    extent = vertices.max(0) - vertices.min(0)
    assert np.allclose(extent, [1, 1, 5])


NAN_CUBE = CUBE_VERTICES.copy()
NAN_CUBE[3, 1] = np.nan
FLAT = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0]], dtype=float)

UNUSABLE = {
    "empty.off": (lambda: b"", "empty file"),
    "broken_header.off": (lambda: "OFF123 456 0\n", "unreadable OFF file"),
    "points_only.ply": (lambda: ply_ascii_points(CUBE_VERTICES), "no faces"),
    "points_only_binary.ply": (lambda: ply_binary(CUBE_VERTICES, None), "no faces"),
    "points_only.obj": (lambda: "".join(f"v {x} {y} {z}\n" for x, y, z in CUBE_VERTICES), "no faces"),
    "no_vertices.obj": (lambda: "# nothing here\n", "no vertices"),
    "empty_solid.stl": (lambda: "solid empty\nendsolid empty\n", "no vertices"),
    "nan.off": (lambda: off_text(NAN_CUBE, CUBE_QUADS), "NaN or infinite"),
    "zero_area.off": (lambda: off_text(FLAT, [[0, 1, 2]]), "zero surface area"),
    "cube.xyz": (lambda: "0 0 0\n", "unsupported file type '.xyz'"),
}


@pytest.mark.parametrize("name", UNUSABLE)
def test_unusable_files_raise_one_line_reason(tmp_path, name):
    make, reason = UNUSABLE[name]
    with pytest.raises(UnusableFile) as info:
        load_mesh(_write(tmp_path, name, make()))
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


def test_degenerate_faces_are_dropped_but_mesh_kept(tmp_path):
    vertices = np.vstack([CUBE_VERTICES, [[5, 5, 5]]])
    faces = [*CUBE_QUADS, [8, 8, 8]]
    _, kept = load_mesh(_write(tmp_path, "cube_plus_degenerate.off", off_text(vertices, faces)))
    assert len(kept) == 12
