"""The prepared-dataset format: one `.npy` per array and a `manifest.json`, in one folder.

`.npy` is byte-deterministic (unlike `.npz`, whose zip entries carry timestamps) and memory-mappable. The
manifest records every file's sha256, shape and dtype, so a reader can refuse a truncated or altered file
by name before it is used.
"""

from __future__ import annotations

import hashlib
import json
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
        try:
            array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DatasetError(f"{path}: unreadable ({err}); rerun the stage that writes it") from None
        if list(array.shape) != expected["shape"] or str(array.dtype) != expected["dtype"]:
            raise DatasetError(
                f"{path}: shape {list(array.shape)} {array.dtype}, manifest says {expected['shape']} "
                f"{expected['dtype']}; rerun the stage that writes it"
            )
        return array


def open_dataset(folder: Path | str, kind: str, verify: bool = True) -> PreparedDataset:
    """Open a prepared dataset of the given kind, checking that it is whole (every file, every hash)."""
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
    if verify:
        for name, expected in manifest["files"].items():
            path = folder / name
            if not path.is_file():
                raise DatasetError(f"{path}: missing; rerun the stage that writes it")
            if sha256_file(path) != expected["sha256"]:
                raise DatasetError(f"{path}: content does not match its manifest hash; rerun the stage")
    return PreparedDataset(folder, manifest)


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
