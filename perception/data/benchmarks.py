"""The field's point-cloud benchmarks in their released HDF5 layouts, read with h5py.

- `modelnet40_h5`: PointNet's `modelnet40_ply_hdf5_2048` folder: `ply_data_train{0..4}.h5` and
  `ply_data_test{0,1}.h5`, each with `data` float32[N, 2048, 3] and `label` uint8[N, 1]; `shape_names.txt`
  (the 40 class names, one per line, in label order) and `{train,test}_files.txt` (the h5 files of each
  split, one path per line; only the file names are used, found beside the lists).
- `scanobjectnn`: ScanObjectNN's `h5_files` folder. Each variant is a pair of files (`VARIANTS`):
  `{training,test}_objectdataset[suffix].h5` with `data` [N, 2048, 3], `label` [N] and `mask` [N, 2048]
  (-1 marks a background point; the benchmark's own `convert_to_binary_mask` reads it so). The 15 class
  names are the benchmark's, in its label order.

Both releases are y-up: PointNet's `provider.rotate_point_cloud` and ScanObjectNN's copy of it rotate
"along up direction" about y. Set `points.up_axis: y` (the profiles do) to turn them +z up.

Everything is checked before it is used: a missing file, a file without `data` or `label`, counts that
differ, clouds of the wrong shape, a label outside the class list, NaN or infinite coordinates each raise
a DatasetError of one line naming the file and the key or value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perception.data.arrays import DatasetError

SPLITS = ("train", "test")
SCANOBJECTNN_CLASSES = (
    "bag", "bin", "box", "cabinet", "chair", "desk", "display", "door", "shelf", "table", "bed", "pillow",
    "sink", "sofa", "toilet",
)  # fmt: skip
# variant -> (folder, file suffix): OBJ_ONLY, OBJ_BG and the hardest perturbed variant, PB_T50_RS.
VARIANTS = {
    "obj_only": ("main_split_nobg", ""),
    "obj_bg": ("main_split", ""),
    "pb_t50_rs": ("main_split", "_augmentedrot_scale75"),
}
_SCANOBJECTNN_SPLIT = {"train": "training", "test": "test"}  # the files' own split names


@dataclass(frozen=True)
class Clouds:
    """One split of a benchmark: its clouds (float32[n, 3] each: every cloud's own points), labels, and
    where each came from (`<file>:<index>`)."""

    clouds: list[np.ndarray]
    labels: np.ndarray  # int64[N]
    sources: list[str]


def modelnet40_files(root: Path) -> tuple[list[str], dict[str, list[Path]]]:
    """(class names, split -> its h5 files) of a `modelnet40_ply_hdf5_2048` folder."""
    names = _required(root / "shape_names.txt")
    classes = [line.strip() for line in names.read_text().splitlines() if line.strip()]
    if not classes:
        raise DatasetError(f"{names}: no class names; expected one name per line, in label order")
    files = {}
    for split in SPLITS:
        listing = root / f"{split}_files.txt"
        if listing.is_file():
            listed = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
            files[split] = [_required(root / Path(line).name, f"listed in {listing}") for line in listed]
        else:
            files[split] = sorted(root.glob(f"ply_data_{split}*.h5"))
        if not files[split]:
            raise DatasetError(
                f"{root}: no {split} files (neither {split}_files.txt nor ply_data_{split}*.h5); expected "
                "PointNet's modelnet40_ply_hdf5_2048 folder"
            )
    return classes, files


def scanobjectnn_files(root: Path, variant: str) -> dict[str, Path]:
    """split -> the h5 file of `variant` in an `h5_files` folder."""
    if variant not in VARIANTS:
        raise DatasetError(f"points.variant = {variant!r}: expected one of {', '.join(VARIANTS)}")
    folder, suffix = VARIANTS[variant]
    return {
        split: _required(root / folder / f"{_SCANOBJECTNN_SPLIT[split]}_objectdataset{suffix}.h5", variant)
        for split in SPLITS
    }


def _required(path: Path, why: str = "") -> Path:
    if not path.is_file():
        raise DatasetError(f"{path}: missing{f' ({why})' if why else ''}")
    return path


def read_h5(path: Path, num_classes: int, drop_background: bool = False) -> Clouds:
    """The clouds and labels of one benchmark file, checked (see the module doc). `drop_background` keeps
    only the points its `mask` does not mark -1 (background)."""
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise DatasetError(f"{path}: not a readable HDF5 file ({' '.join(str(err).split())[:120]})") from None
    with handle:
        for key in ("data", "label", *(("mask",) if drop_background else ())):
            if key not in handle:
                raise DatasetError(
                    f"{path}: no '{key}' dataset (it has {', '.join(sorted(handle)) or 'none'}); expected "
                    "data float[clouds, points, 3], label int[clouds] or [clouds, 1]"
                    + (", mask int[clouds, points] for points.drop_background" if key == "mask" else "")
                )
        data, label = handle["data"][()], handle["label"][()]
        mask = handle["mask"][()] if drop_background else None
    if data.ndim != 3 or data.shape[2] != 3 or data.shape[1] == 0 or data.dtype.kind != "f":
        raise DatasetError(
            f"{path}: data has shape {list(data.shape)} {data.dtype}; expected float[clouds, points, 3]"
        )
    if label.ndim == 2 and label.shape[1] == 1:
        label = label[:, 0]
    if label.ndim != 1 or label.dtype.kind not in "iu":
        raise DatasetError(
            f"{path}: label has shape {list(label.shape)} {label.dtype}; expected int[clouds] or [clouds, 1]"
        )
    if len(label) != len(data):
        raise DatasetError(
            f"{path}: data holds {len(data)} clouds but label {len(label)}; expected one label per cloud"
        )
    outside = np.flatnonzero((label < 0) | (label >= num_classes))
    if len(outside):
        i = int(outside[0])
        raise DatasetError(
            f"{path}: label {int(label[i])} of cloud {i} is outside the {num_classes} classes (0 to "
            f"{num_classes - 1}); {len(outside)} labels in all"
        )
    bad = ~np.isfinite(data).all(axis=2)  # [clouds, points]
    if bad.any():
        i = int(np.flatnonzero(bad.any(axis=1))[0])
        raise DatasetError(f"{path}: data of cloud {i} has {int(bad[i].sum())} NaN or infinite points")
    if mask is not None and mask.shape != data.shape[:2]:
        raise DatasetError(
            f"{path}: mask has shape {list(mask.shape)}; expected {list(data.shape[:2])}, a value per point"
        )
    clouds = [data[i] if mask is None else data[i][mask[i] != -1] for i in range(len(data))]
    return Clouds(
        clouds=[c.astype(np.float32) for c in clouds],
        labels=label.astype(np.int64),
        sources=[f"{path.name}:{i}" for i in range(len(data))],
    )


def read_split(files: list[Path], num_classes: int, drop_background: bool = False) -> Clouds:
    """Every file of one split, concatenated in order."""
    parts = [read_h5(path, num_classes, drop_background) for path in files]
    return Clouds(
        clouds=[c for part in parts for c in part.clouds],
        labels=np.concatenate([part.labels for part in parts]) if parts else np.zeros(0, np.int64),
        sources=[s for part in parts for s in part.sources],
    )
