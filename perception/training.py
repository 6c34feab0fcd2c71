"""The training loop the study's trials run: seeded batches, rotation augmentation, one epoch, accuracy.

Plain torch, no orchestration: `pipeline.training` calls these from inside Ray Tune trials and owns
checkpoints, reporting and tracking. Everything random takes a `torch.Generator`, so the same seed gives
the same batches, the same rotations and (on CPU) the same numbers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perception.rotations import MODES, sample_rotations


def augment_points(points: Tensor, mode: str, generator: torch.Generator) -> Tensor:
    """Rotate every cloud of float[B, N, 3] by its own random rotation: `z` about the up axis, `so3` any."""
    if mode not in MODES:
        raise ValueError(f"augment = {mode!r} is not allowed: expected one of {', '.join(MODES)}")
    if mode == "none":
        return points
    rotation = sample_rotations(points.shape[0], mode, generator, points.dtype)
    # Row vectors: p' = p R^T, i.e. [B, N, 3] @ [B, 3, 3].
    return points @ rotation.transpose(1, 2)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held out): `fraction` of every class held out (at least one where a class has 2+)."""
    rng = np.random.default_rng([seed, 0x5EED])
    train, held = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        count = min(len(members) - 1, max(1, round(fraction * len(members)))) if len(members) > 1 else 0
        held.append(members[:count])
        train.append(members[count:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def subsample_points(points: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """A random subset of `count` points of every cloud, float[B, N, 3] -> float[B, count, 3]."""
    if count <= 0 or count >= points.shape[1]:
        return points
    keys = torch.rand(points.shape[0], points.shape[1], generator=generator)
    index = keys.argsort(dim=1)[:, :count]  # [B, count]
    return torch.gather(points, 1, index.unsqueeze(-1).expand(-1, -1, 3))


def batches(count: int, batch_size: int, generator: torch.Generator | None) -> Iterator[Tensor]:
    """Index batches over `count` samples: shuffled with `generator`, in order without one."""
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    yield from order.split(batch_size)


def random_state(generator: torch.Generator) -> dict[str, Tensor]:
    """Everything random a resumed run needs: the batch generator and torch's global RNG (dropout)."""
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def restore_random_state(generator: torch.Generator, state: dict[str, Tensor]) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


@dataclass(frozen=True)
class StepSettings:
    batch_size: int = 32
    augment: str = "none"  # point models: rotation augmentation, one of perception.rotations.MODES
    points_per_cloud: int = 0  # point models: random subset of points per cloud and step; 0 keeps all
    grad_clip: float = 0.0  # clip the gradient's global norm to this before each step; 0 does not clip
    bf16: bool = False  # autocast to bfloat16 (CUDA or CPU)


# Parameters no optimiser decays: Mamba's `_no_weight_decay` (A_log, D) and its step bias (dt_bias), whose
# values are a schedule of time scales, not weights to shrink towards 0.
NO_WEIGHT_DECAY = ("A_log", "D", "dt_bias")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's groups: every parameter decays by `weight_decay` except those named in NO_WEIGHT_DECAY."""
    decay: list[nn.Parameter] = []
    keep: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        (keep if name.rsplit(".", 1)[-1] in NO_WEIGHT_DECAY else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    return groups + ([{"params": keep, "weight_decay": 0.0}] if keep else [])


def adamw(groups: list[dict], lr: float) -> torch.optim.AdamW:
    """AdamW as one fused kernel over every parameter: the same update as the per-tensor loop (`adamw_ref`),
    rounded in another order, and on a CPU a fifth of its time a step for the study's small models."""
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def adamw_ref(groups: list[dict], lr: float) -> torch.optim.AdamW:
    """AdamW one parameter at a time: torch's default on a CPU, and `adamw`'s reference."""
    return torch.optim.AdamW(groups, lr=lr, foreach=False)


def warmup_cosine(epochs: int, warmup_epochs: int = 0):
    """The learning-rate factor of epoch e (`torch.optim.lr_scheduler.LambdaLR`): a linear ramp over the
    first `warmup_epochs` ((e + 1) / (warmup + 1)), then a cosine from 1 to 0 over the rest. With no warmup
    it is CosineAnnealingLR's schedule (eta_min 0): 0.5 * (1 + cos(pi * e / epochs))."""
    span = max(1, epochs - warmup_epochs)

    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return (epoch + 1) / (warmup_epochs + 1)
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / span))

    return factor


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: Tensor,
    labels: Tensor,
    settings: StepSettings,
    generator: torch.Generator,
    device: torch.device,
) -> float:
    """One pass over (inputs, labels) in shuffled batches; returns the mean training loss."""
    model.train()
    is_points = inputs.dim() == 3
    total, seen = 0.0, 0
    for index in batches(len(labels), settings.batch_size, generator):
        x, y = inputs[index], labels[index]
        if is_points:
            x = subsample_points(x, settings.points_per_cloud, generator)
            x = augment_points(x, settings.augment, generator)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, settings.bf16):
            loss = F.cross_entropy(model(x).float(), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()}: lower the learning rate")
        loss.backward()
        if settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        total += loss.item() * len(y)
        seen += len(y)
    return total / max(seen, 1)


@torch.inference_mode()  # not no_grad: no version counters or view tracking for tensors never trained on
def predict(
    model: nn.Module, inputs: Tensor, batch_size: int, device: torch.device, bf16: bool = False
) -> Tensor:
    """Predicted class of every sample: int64[count]."""
    model.eval()
    out = []
    for index in batches(len(inputs), batch_size, None):
        with _autocast(device, bf16):
            out.append(model(inputs[index].to(device)).argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def correct(
    model: nn.Module, inputs: Tensor, labels: Tensor, batch_size: int, device: torch.device, bf16=False
) -> Tensor:
    """Whether each sample was classified right: bool[count]."""
    return predict(model, inputs, batch_size, device, bf16) == labels.cpu()


def accuracy(
    model: nn.Module, inputs: Tensor, labels: Tensor, batch_size: int, device: torch.device, bf16=False
) -> float:
    right = correct(model, inputs, labels, batch_size, device, bf16)
    return float(right.float().mean()) if len(labels) else float("nan")


def pack_correct(correct: np.ndarray | Tensor) -> str:
    """bool[N], whether each validation sample was classified right, as hex: 8 samples a byte, the last
    byte padded with zeros. One epoch of a 169-sample split is 44 characters in a trial's report."""
    bits = np.asarray(correct, dtype=bool).reshape(-1)
    return np.packbits(bits).tobytes().hex()


def unpack_correct(packed: str, count: int) -> np.ndarray:
    """`pack_correct`'s inverse: bool[count]."""
    try:
        raw = bytes.fromhex(packed)
    except (TypeError, ValueError):
        shown = packed[:40] + "..." if isinstance(packed, str) and len(packed) > 40 else packed
        raise ValueError(f"a packed correctness record must be a hex string, found {shown!r}") from None
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))
    if len(bits) < count:
        raise ValueError(f"a packed correctness record of {len(bits)} bits cannot hold {count} samples")
    return bits[:count].astype(bool)


def last_quarter_gain(curve: Sequence[float]) -> float:
    """How much a validation curve (accuracy per epoch) still rose over its last quarter of epochs: the
    least-squares line through those epochs (the last ceil(n / 4), at least 2), from the first of them to
    the last. A line rather than two points, so that from four epochs on no single one decides; with three,
    the line's gain is the last minus the first and the middle one does not count, and with two it is their
    difference. NaN for a curve of fewer than 2 epochs."""
    values = np.asarray(curve, dtype=float)
    if len(values) < 2:
        return float("nan")
    tail = values[-max(2, math.ceil(len(values) / 4)) :]
    epochs = np.arange(len(tail), dtype=float)
    slope = np.polyfit(epochs, tail, 1)[0]
    return float(slope * (len(tail) - 1))


def last_quarter_weights(epochs: int) -> np.ndarray:
    """float64[T]: the weights on a curve's last T = max(2, ceil(epochs / 4)) values whose weighted sum is
    `last_quarter_gain` (the least-squares slope is linear in the values: sum_t (t - mean) y_t / sum_t
    (t - mean)^2, times T - 1). Linear, so the gain of the mean curve is the mean of per-sample gains, and
    `perception.evaluation.plateau` can bootstrap it over seeds and validation samples like an accuracy."""
    if epochs < 2:
        raise ValueError(f"a last-quarter gain needs at least 2 epochs, got {epochs}")
    tail = max(2, math.ceil(epochs / 4))
    centred = np.arange(tail, dtype=np.float64) - (tail - 1) / 2
    return centred * (tail - 1) / float(np.sum(centred**2))
