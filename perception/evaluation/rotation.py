"""Rotation robustness of point-cloud classifiers: accuracy under random rotations, and measured invariance.

`evaluate_rotations` rotates every test cloud by its own seeded random rotation (none, about the up axis
+z, or anywhere in SO(3): `perception.rotations`), several draws per mode, and reports accuracy per draw
and per rotation angle. `invariance_error` measures how far a model's logits move under rotations, in
float64 by default so that rounding does not hide (or fake) invariance. Plain torch: seeded
`torch.Generator`s, no orchestration.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from perception.rotations import MODES, check_mode, geodesic_angle_deg, rotation_draws
from perception.training import predict

BIN_WIDTH_DEG = 15.0
NUM_BINS = 12  # 12 x 15 degrees cover [0, 180]; 180 itself goes in the last bin


@dataclass(frozen=True)
class AngleBin:
    """Accuracy over the (sample, draw) pairs whose rotation angle lies in [low_deg, high_deg)."""

    low_deg: float
    high_deg: float
    accuracy: float  # nan when count == 0
    count: int


@dataclass(frozen=True)
class RotationResult:
    """Accuracy of one model under one rotation mode, over `len(draw_accuracies)` seeded draws."""

    mode: str
    accuracy: float  # mean of draw_accuracies
    accuracy_std: float  # sample standard deviation (ddof=1) over draws; 0 for a single draw
    draw_accuracies: tuple[float, ...]
    angle_bins: tuple[AngleBin, ...]  # 15-degree bins over [0, 180], pooled over samples and draws
    correct: Tensor | None = None  # bool[N, D]: sample n right under its draw d (for intervals over samples)
    angles_deg: Tensor | None = None  # float64[N, D]: the rotation angle of each (sample, draw)

    def as_dict(self) -> dict[str, Any]:
        """Plain python (lists and dicts of str, float, int) for JSON; empty bins keep accuracy NaN."""
        return {
            "mode": self.mode,
            "accuracy": self.accuracy,
            "accuracy_std": self.accuracy_std,
            "draw_accuracies": list(self.draw_accuracies),
            "angle_bins": [asdict(b) for b in self.angle_bins],
        }


def _angle_bins(angles: Tensor, correct: Tensor) -> tuple[AngleBin, ...]:
    """Pool flat float[K] angles (degrees) and bool[K] correctness into NUM_BINS bins of BIN_WIDTH_DEG."""
    # floor(angle / 15), with 180 (index 12) folded into the last bin.
    index = (angles / BIN_WIDTH_DEG).floor().long().clamp(0, NUM_BINS - 1)
    counts = torch.bincount(index, minlength=NUM_BINS)
    hits = torch.bincount(index, weights=correct.double(), minlength=NUM_BINS)
    bins = []
    for i in range(NUM_BINS):
        count = int(counts[i])
        bins.append(
            AngleBin(
                low_deg=i * BIN_WIDTH_DEG,
                high_deg=(i + 1) * BIN_WIDTH_DEG,
                accuracy=float(hits[i]) / count if count else float("nan"),
                count=count,
            )
        )
    return tuple(bins)


def evaluate_rotations(
    model: nn.Module,
    points: Tensor,
    labels: Tensor,
    modes: tuple[str, ...] | list[str] = MODES,
    draws: int = 4,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device = torch.device("cpu"),  # noqa: B008 - an immutable default
) -> dict[str, RotationResult]:
    """Accuracy of `model` on clouds float[N, P, 3] with labels int64[N], each cloud rotated by its own
    random rotation, `draws` times per mode (`none` is deterministic, so it gets one draw).

    The model must already be on `device`; it runs in eval mode without gradients and gets its previous
    train/eval mode back afterwards. Rotations are drawn by `rotation_draws(N, draws, mode, seed)`.
    """
    for mode in modes:
        check_mode(mode)
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if points.ndim != 3 or points.shape[-1] != 3 or len(labels) != len(points):
        raise ValueError(
            f"expected points [N, P, 3] and labels [N], got {tuple(points.shape)} and {tuple(labels.shape)}"
        )
    count = len(points)
    labels = labels.cpu()
    was_training = model.training
    results: dict[str, RotationResult] = {}
    try:
        with torch.no_grad():
            for mode in modes:
                mode_draws = 1 if mode == "none" else draws
                rotations = rotation_draws(count, mode_draws, mode, seed)  # [D, N, 3, 3], float64
                draw_accuracies: list[float] = []
                correct_per_draw: list[Tensor] = []
                for rotation in rotations.to(points.dtype):  # [N, 3, 3]
                    # Row vectors: p' = p R^T, i.e. [N, P, 3] @ [N, 3, 3].
                    rotated = points @ rotation.transpose(-1, -2).to(points.device)
                    correct = predict(model, rotated, batch_size, device) == labels  # bool[N]
                    correct_per_draw.append(correct)
                    draw_accuracies.append(float(correct.double().mean()) if count else float("nan"))
                accuracies = torch.tensor(draw_accuracies, dtype=torch.float64)
                # Pool (sample, draw) pairs: angles [D, N] and correct [D, N] -> flat [D * N].
                angles = geodesic_angle_deg(rotations).reshape(-1)
                correct_all = torch.stack(correct_per_draw).reshape(-1)
                results[mode] = RotationResult(
                    mode=mode,
                    accuracy=float(accuracies.mean()),
                    accuracy_std=float(accuracies.std()) if mode_draws > 1 else 0.0,
                    draw_accuracies=tuple(draw_accuracies),
                    angle_bins=_angle_bins(angles, correct_all),
                    correct=torch.stack(correct_per_draw).T.contiguous(),  # [D, N] -> [N, D]
                    angles_deg=geodesic_angle_deg(rotations).T.contiguous(),  # [D, N] -> [N, D]
                )
    finally:
        model.train(was_training)
    return results


def invariance_error(
    model: nn.Module,
    points: Tensor,
    rotations: int = 4,
    seed: int = 0,
    batch_size: int = 16,
    dtype: torch.dtype = torch.float64,
) -> float:
    """Worst relative change of the logits under rotation: max over clouds and draws of
    ||f(x R^T) - f(x)|| / max(||f(x)||, 1e-12), with L2 norms over each cloud's logits.

    Runs a CPU copy of the model in `dtype` (the caller's model is untouched), in eval mode, on clouds
    float[N, P, 3], each rotated by its own Haar-random rotation, `rotations` times (`rotation_draws(N,
    rotations, "so3", seed)`). In float64 (the default, so that rounding does not hide or fake invariance)
    about 1e-15 for an exactly invariant model built in float64; a model whose constants were computed in
    float32 (e3nn builds them in the default dtype) keeps their rounding. `dtype=torch.float32` measures
    what float32 inference does.
    """
    if rotations < 1 or len(points) == 0:
        raise ValueError(f"need >= 1 rotation and >= 1 cloud, got {rotations} and {len(points)}")
    model_copy = copy.deepcopy(model).to(device="cpu", dtype=dtype).eval()
    clouds = points.detach().to(device="cpu", dtype=dtype)
    draws = rotation_draws(len(clouds), rotations, "so3", seed).to(dtype)  # [R, N, 3, 3]
    worst = 0.0
    with torch.no_grad():
        for start in range(0, len(clouds), batch_size):
            batch = clouds[start : start + batch_size]  # [b, P, 3]
            logits = model_copy(batch)  # [b, C]
            scale = logits.norm(dim=-1).clamp_min(1e-12)  # [b]
            for rotation in draws[:, start : start + batch_size]:  # [b, 3, 3]
                change = (model_copy(batch @ rotation.transpose(-1, -2)) - logits).norm(dim=-1)  # [b]
                worst = max(worst, float((change / scale).max()))
    return worst


__all__ = [
    "AngleBin",
    "RotationResult",
    "evaluate_rotations",
    "invariance_error",
]
