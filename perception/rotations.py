"""Rotations of point clouds: the study's rotation modes, seeded samplers, and geodesic angles.

A mode names a kind of rotation: `none` (the identity), `z` (about the up axis +z) or `so3` (anywhere in
SO(3), Haar-uniform). Training augmentation (`perception.training`) and the rotation evaluation
(`perception.evaluation.rotation`) both draw here, so a mode means the same rotations in both. Everything
random takes a `torch.Generator`; matrices act on row vectors as p' = p R^T.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

RotationMode = Literal["none", "z", "so3"]
MODES: tuple[RotationMode, ...] = get_args(RotationMode)


def check_mode(mode: str) -> None:
    """Raise a one-line ValueError unless `mode` is one of MODES."""
    if mode not in MODES:
        raise ValueError(f"rotation mode {mode!r} is not allowed: expected one of {', '.join(MODES)}")


def random_rotations(count: int, generator: torch.Generator, dtype=torch.float32) -> Tensor:
    """`count` rotation matrices drawn uniformly from SO(3) (Haar measure): float[count, 3, 3].

    A uniformly random unit quaternion (four standard normals, normalised) gives a Haar-uniform rotation.
    """
    q = torch.randn(count, 4, generator=generator, dtype=torch.float64)  # [count, 4]
    w, x, y, z = (q / q.norm(dim=1, keepdim=True)).unbind(1)  # 4 x [count]
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    # 9 x [count] -> [count, 9] -> [count, 3, 3], row-major.
    return torch.stack(rows, dim=1).reshape(count, 3, 3).to(dtype)


def rotations_about_z(angles: Tensor) -> Tensor:
    """Rotations by `angles` (radians, float[count]) about the up axis +z: float[count, 3, 3]."""
    c, s = torch.cos(angles), torch.sin(angles)
    zero, one = torch.zeros_like(angles), torch.ones_like(angles)
    rows = [c, -s, zero, s, c, zero, zero, zero, one]
    # 9 x [count] -> [count, 9] -> [count, 3, 3], row-major.
    return torch.stack(rows, dim=1).reshape(-1, 3, 3)


def sample_rotations(count: int, mode: str, generator: torch.Generator, dtype=torch.float32) -> Tensor:
    """`count` rotations of one mode: float[count, 3, 3].

    `none` gives identities (nothing is drawn), `z` uniform angles in [0, 2 pi) about the up axis, `so3`
    Haar-uniform rotations.
    """
    check_mode(mode)
    if mode == "none":
        return torch.eye(3, dtype=dtype).expand(count, 3, 3).clone()
    if mode == "z":
        angles = torch.rand(count, generator=generator, dtype=torch.float64) * (2 * math.pi)  # [count]
        return rotations_about_z(angles).to(dtype)
    return random_rotations(count, generator, dtype)


def rotation_draws(count: int, draws: int, mode: str, seed: int) -> Tensor:
    """One rotation per sample per draw: float64[draws, count, 3, 3].

    `none` gives identities, `z` uniform angles in [0, 2 pi) about +z, `so3` Haar-uniform rotations. The
    generator is seeded with `seed * len(MODES) + index of mode`, so each (seed, mode) has its own stream
    and the same arguments give the same rotations byte for byte.
    """
    check_mode(mode)
    if count < 0 or draws < 0:
        raise ValueError(f"count and draws must be >= 0, got count={count}, draws={draws}")
    generator = torch.Generator().manual_seed(seed * len(MODES) + MODES.index(mode))
    flat = sample_rotations(draws * count, mode, generator, torch.float64)
    # [draws * count, 3, 3] -> [draws, count, 3, 3]: draw-major, matching the order of the draws above.
    return flat.reshape(draws, count, 3, 3)


def geodesic_angle_deg(rotations: Tensor) -> Tensor:
    """Rotation angle in degrees of float[..., 3, 3] rotation matrices: float[...], in [0, 180].

    arccos((trace - 1) / 2), with the cosine clamped to [-1, 1] since rounding can push it just outside.
    """
    trace = rotations.diagonal(dim1=-2, dim2=-1).sum(dim=-1)  # [..., 3, 3] -> [..., 3] -> [...]
    return torch.rad2deg(torch.arccos(((trace - 1) / 2).clamp(-1.0, 1.0)))


__all__ = [
    "MODES",
    "RotationMode",
    "check_mode",
    "geodesic_angle_deg",
    "random_rotations",
    "rotation_draws",
    "rotations_about_z",
    "sample_rotations",
]
