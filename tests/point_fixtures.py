"""Point-cloud datasets the tests write themselves, in the exact layouts of the real releases, with the
libraries users read them with: PointNet's ModelNet40 HDF5 folder and ScanObjectNN's h5_files (h5py: the
keys, shapes and dtypes of the releases), and point files (open3d for PLY, PCD and PTS, numpy for NPY,
plain text for XYZ and TXT)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from perception.data.benchmarks import SCANOBJECTNN_CLASSES, VARIANTS


def clouds(count: int, points: int, seed: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32[count, points, 3], int labels[count]): class c is an ellipsoid stretched along y by 1 + c,
    each cloud its own random points, so every cloud is told apart by its points."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % classes
    directions = rng.normal(size=(count, points, 3))
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    data = directions * np.stack([np.ones(count), 1.0 + labels, np.ones(count)], axis=1)[:, None, :]
    return data.astype(np.float32), labels


def write_h5(path: Path, **arrays: np.ndarray) -> Path:
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        for key, value in arrays.items():
            handle.create_dataset(key, data=value)
    return path


def modelnet40_h5(root: Path, per_split: dict[str, int], points: int = 64, classes: int = 3) -> Path:
    """`modelnet40_ply_hdf5_2048`: ply_data_train{0,1}.h5 and ply_data_test0.h5 (data float32[N, P, 3],
    label uint8[N, 1], and the `normal` some copies carry), shape_names.txt, and the file lists, whose
    lines name the files as the release does (`data/modelnet40_ply_hdf5_2048/ply_data_train0.h5`)."""
    root.mkdir(parents=True, exist_ok=True)
    names = [f"class{c}" for c in range(classes)]
    (root / "shape_names.txt").write_text("\n".join(names) + "\n")
    for split, count in per_split.items():
        data, labels = clouds(count, points, seed={"train": 1, "test": 2}[split], classes=classes)
        parts = np.array_split(np.arange(count), 2 if split == "train" else 1)
        listed = []
        for i, part in enumerate(parts):
            name = f"ply_data_{split}{i}.h5"
            write_h5(
                root / name,
                data=data[part],
                label=labels[part].astype(np.uint8)[:, None],
                normal=np.zeros_like(data[part]),
            )
            listed.append(f"data/modelnet40_ply_hdf5_2048/{name}")
        (root / f"{split}_files.txt").write_text("\n".join(listed) + "\n")
    return root


def scanobjectnn_h5(root: Path, per_split: dict[str, int], points: int = 64, background: int = 16) -> Path:
    """`h5_files` with every variant's pair of files: data float32[N, P, 3], label int64[N], mask
    int32[N, P] (-1 on the last `background` points of every cloud, which sit far from the object)."""
    for folder, suffix in VARIANTS.values():
        for split, count in per_split.items():
            data, labels = clouds(count, points, seed={"train": 3, "test": 4}[split], classes=15)
            mask = np.zeros((count, points), dtype=np.int32)
            mask[:, points - background :] = -1
            data[:, points - background :] = 5.0  # background: far from the object
            prefix = {"train": "training", "test": "test"}[split]
            write_h5(
                root / folder / f"{prefix}_objectdataset{suffix}.h5",
                data=data,
                label=labels.astype(np.int64),
                mask=mask,
            )
    return root


SCANOBJECTNN_CLASS_COUNT = len(SCANOBJECTNN_CLASSES)


def write_point_file(path: Path, points: np.ndarray) -> Path:
    """`points` float[N, 3] in the format `path`'s name says: .ply / .pcd (open3d, ASCII when the name
    holds "ascii", else binary), .pts (open3d), .xyz, .txt (x y z and two more columns), .npy ([N, 6])."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix in (".ply", ".pcd", ".pts"):
        import open3d as o3d

        cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(points, dtype=np.float64)))
        ascii_ = "ascii" in path.name or suffix == ".pts"
        assert o3d.io.write_point_cloud(str(path), cloud, write_ascii=ascii_)
    elif suffix == ".xyz":
        np.savetxt(path, points, fmt="%.7f")
    elif suffix == ".txt":  # x y z, then an intensity and a ring number that the reader ignores
        np.savetxt(path, np.c_[points, np.ones(len(points)), np.arange(len(points))], fmt="%.7f")
    elif suffix == ".npy":
        np.save(path, np.c_[points, np.zeros((len(points), 3))].astype(np.float32), allow_pickle=False)
    else:
        raise ValueError(suffix)
    return path
