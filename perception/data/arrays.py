"""The prepared-dataset format: one `.npy` per array and a `manifest.json`, in one folder.

`.npy` is byte-deterministic (unlike `.npz`, whose zip entries carry timestamps) and memory-mappable. The
manifest records every file's sha256, shape and dtype, so a reader can refuse a truncated or altered file
by name before it is used; it also holds every file to its kind's layout (points [N, P, 3], images
[N, C, R, R], labels [N]) and refuses NaN or inf, which a hash cannot tell from sound data.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"


class DatasetError(ValueError):
    """A prepared dataset that is missing, partial or corrupted; the message names the file."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_dataset(folder: Path, arrays: dict[str, np.ndarray], manifest: dict[str, Any]) -> dict[str, Any]:
    """Write each array as `<name>.npy` and a manifest with their hashes; returns the manifest written."""
    files = {}
    for name, array in sorted(arrays.items()):
        path = folder / f"{name}.npy"
        np.save(path, np.ascontiguousarray(array), allow_pickle=False)
        files[path.name] = {
            "sha256": sha256_file(path),
            "shape": list(array.shape),
            "dtype": str(array.dtype),
        }
    manifest = {**manifest, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


@dataclass(frozen=True)
class PreparedDataset:
    folder: Path
    manifest: dict[str, Any]
    # True when `open_dataset` read every file whole: readable, the manifest's shape, finite values.
    checked: bool = False

    @property
    def manifest_sha256(self) -> str:
        return sha256_file(self.folder / MANIFEST)

    def array(self, name: str, mmap: bool = False) -> np.ndarray:
        path = self.folder / f"{name}.npy"
        expected = self.manifest["files"].get(path.name)
        if expected is None:
            raise DatasetError(
                f"{path}: not part of this dataset; it has {', '.join(self.manifest['files'])}"
            )
        return _load(path, expected, mmap, check_values=not self.checked)


def _load(path: Path, expected: dict[str, Any], mmap: bool, check_values: bool = True) -> np.ndarray:
    """`path` as an array, refused by name if unreadable, not the shape and dtype its manifest entry says,
    or (with `check_values`) holding NaN or inf."""
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: unreadable ({err}); rerun the stage that writes it") from None
    if list(array.shape) != expected["shape"] or str(array.dtype) != expected["dtype"]:
        raise DatasetError(
            f"{path}: shape {list(array.shape)} {array.dtype}, manifest says {expected['shape']} "
            f"{expected['dtype']}; rerun the stage that writes it"
        )
    if check_values and array.dtype.kind == "f":
        _check_finite(path, array)
    return array


def _check_finite(path: Path, array: np.ndarray) -> None:
    """Refuse NaN or inf values: a hash only proves the file is the one written, not that it is sound."""
    if array.size == 0:
        return
    rows = array.reshape(array.shape[0] if array.ndim else 1, -1)  # (first axis, everything else)
    # In blocks of rows, so that a large memory-mapped array is never copied whole.
    step = max(1, (1 << 24) // rows.shape[1])
    count, first = 0, -1
    for start in range(0, len(rows), step):
        bad = ~np.isfinite(rows[start : start + step])
        if bad.any():
            count += int(bad.sum())
            if first < 0:
                first = start + int(np.argmax(bad.any(axis=1)))
    if count:
        unit = "vertex" if path.stem.endswith("_vertices") else "sample"
        raise DatasetError(
            f"{path}: {count} non-finite values (first in {unit} {first}); rerun the stage that writes it"
        )


def _expected_shape(kind: str, name: str, manifest: dict[str, Any]) -> tuple[list[int | None], str] | None:
    """The shape file `name` of a `kind` dataset must have (None: any size) and what its axes are, from the
    manifest (the split's sample count, points per cloud, channels) and the `r<R>` in an image file's name;
    None for a file without a fixed layout."""
    split, _, rest = name.removesuffix(".npy").partition("_")
    count = manifest.get("splits", {}).get(split, {}).get("count")
    if rest == "labels":
        return [count], "[samples]"
    if kind == "points":
        if rest == "points":
            return [count, manifest.get("params", {}).get("num_points"), 3], "[samples, points, xyz]"
        if rest == "dense":
            return [count, None, 3], "[samples, points, xyz]"
        if rest in ("mesh_vertices", "mesh_faces"):
            return [None, 3], f"[{rest.removeprefix('mesh_')}, 3]"
        if rest in ("mesh_vertex_offsets", "mesh_face_offsets"):
            return [None if count is None else count + 1], "[samples + 1]"
    # `r<R>`, or a named test set at R: `fov_r64`, `scaled64_r32` (perception.data.canvas).
    if kind == "images" and (match := re.fullmatch(r"(?:[a-z]+\d*_)?r(\d+)", rest)):
        resolution, channels = int(match[1]), manifest.get("channels")
        return [count, None if channels is None else len(channels), resolution, resolution], (
            "[samples, channels, R, R]"
        )
    return None


def _check_layout(folder: Path, kind: str, manifest: dict[str, Any]) -> None:
    """Every file's shape (as the manifest records it, which `array` holds the file to) fits its kind."""
    for name, entry in manifest["files"].items():
        layout = _expected_shape(kind, name, manifest)
        if layout is None:
            continue
        expected, axes = layout
        shape = entry["shape"]
        if len(shape) != len(expected) or any(
            e is not None and s != e for s, e in zip(shape, expected, strict=True)
        ):
            shown = ", ".join("*" if e is None else str(e) for e in expected)
            raise DatasetError(
                f"{folder / name}: shape {shape}, expected {axes} = [{shown}]; rerun the stage that writes it"
            )


def open_dataset(folder: Path | str, kind: str, verify: bool = True) -> PreparedDataset:
    """Open a prepared dataset of the given kind, checking that it is whole and sound: every file there, its
    hash, its shape as the kind lays it out, no NaN or inf (`verify=False`: the layout only; `array` checks
    each file it loads)."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise DatasetError(
            f"{manifest_path}: missing; the dataset is absent or was not finished. Run its stage"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        raise DatasetError(f"{manifest_path}: unreadable ({err}); rerun the stage that writes it") from None
    if manifest.get("kind") != kind:
        raise DatasetError(f"{manifest_path}: a {manifest.get('kind')!r} dataset, expected {kind!r}")
    _check_layout(folder, kind, manifest)
    if verify:
        for name, expected in manifest["files"].items():
            path = folder / name
            if not path.is_file():
                raise DatasetError(f"{path}: missing; rerun the stage that writes it")
            if sha256_file(path) != expected["sha256"]:
                raise DatasetError(f"{path}: content does not match its manifest hash; rerun the stage")
            # A hash proves the file is the one written, not that it is sound: a truncated array or NaN
            # points are refused here, before a stage starts any work (memory-mapped: read, not held).
            _load(path, expected, mmap=True)
    return PreparedDataset(folder, manifest, checked=verify)


def pack_meshes(meshes: list[tuple[np.ndarray, np.ndarray]], prefix: str) -> dict[str, np.ndarray]:
    """Concatenate meshes into four arrays: vertices float32[V, 3], faces int32[F, 3] (indices local to each
    mesh) and offsets int64[M + 1] into each; mesh i is vertices[vo[i]:vo[i+1]], faces[fo[i]:fo[i+1]]."""
    vertex_offsets = np.cumsum([0] + [len(v) for v, _ in meshes], dtype=np.int64)
    face_offsets = np.cumsum([0] + [len(f) for _, f in meshes], dtype=np.int64)
    return {
        f"{prefix}_vertices": np.concatenate([v for v, _ in meshes]).astype(np.float32),
        f"{prefix}_faces": np.concatenate([f for _, f in meshes]).astype(np.int32),
        f"{prefix}_vertex_offsets": vertex_offsets,
        f"{prefix}_face_offsets": face_offsets,
    }


def unpack_mesh(arrays: dict[str, np.ndarray], prefix: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    vo, fo = arrays[f"{prefix}_vertex_offsets"], arrays[f"{prefix}_face_offsets"]
    vertices = arrays[f"{prefix}_vertices"][vo[index] : vo[index + 1]]
    faces = arrays[f"{prefix}_faces"][fo[index] : fo[index + 1]]
    return np.asarray(vertices), np.asarray(faces)
