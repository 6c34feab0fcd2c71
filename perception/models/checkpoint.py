"""A trained model on disk: `{format, family, config, state_dict, training, metrics}`, plain values only.

- `family`: a name in `perception.models.FAMILIES`.
- `config`: the family's config as a plain dict (every field), so `build(family, **config)` rebuilds the
  module without knowing how it was trained or which tool trained it.
- `training`: how it was trained (variant, seed, dataset, optimiser settings), for whoever reads the model.
- `metrics`: what it scored when it was saved (the epoch, validation accuracy).

Files are written and read with `torch.save` / `torch.load(weights_only=True)`: a file carrying anything
but tensors and plain values is refused, never run. A file of another format fails with one line.
"""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from perception.models import FAMILIES, build

FORMAT = 2  # 1: the trainer's flat, stringly-keyed config; 2: the family's own config


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint; the message is one line that names the file and the fix."""


@dataclass(frozen=True)
class ModelCheckpoint:
    family: str
    config: dict[str, Any]  # the family config's fields
    state_dict: dict[str, torch.Tensor]
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def input_kind(self) -> str:
        return FAMILIES[self.family].input_kind

    def build(self) -> nn.Module:
        """The module in eval mode with the trained weights loaded."""
        model = build(self.family, **self.config)
        model.load_state_dict(self.state_dict)
        return model.eval()

    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}


def model_config(model: nn.Module) -> dict[str, Any]:
    """The plain-dict config of a model built by `perception.models.build` (its `config` attribute)."""
    config = model.config
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(
            f"{type(model).__name__} has no dataclass `config`: build it with perception.models.build"
        )
    return dataclasses.asdict(config)


def save_checkpoint(path: Path, checkpoint: ModelCheckpoint) -> None:
    torch.save(checkpoint.as_dict(), path)


def load_checkpoint(path: Path, retrain_hint: str = "retrain the model") -> ModelCheckpoint:
    """The checkpoint at `path`, its model config checked by the family; CheckpointError otherwise."""

    def refuse(reason: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a usable checkpoint ({reason}); {retrain_hint}")

    try:
        # weights_only: a checkpoint carrying arbitrary pickled objects is refused, never run.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise refuse(lines[0][:300] if lines else type(err).__name__) from None
    if not isinstance(state, dict):
        raise refuse(f"holds a {type(state).__name__}, not a checkpoint's dict")
    if state.get("format") != FORMAT:
        found = state.get("format", "none: an older checkpoint that stores the trainer's flat config")
        raise refuse(f"format {found}, expected {FORMAT}")
    missing = [key for key in ("family", "config", "state_dict") if key not in state]
    if missing:
        raise refuse(f"no {', '.join(repr(k) for k in missing)}")
    if state["family"] not in FAMILIES:
        raise refuse(f"family {state['family']!r} is not registered; allowed: {', '.join(FAMILIES)}")
    return ModelCheckpoint(
        state["family"],
        dict(state["config"]),
        state["state_dict"],
        dict(state.get("training") or {}),
        dict(state.get("metrics") or {}),
    )


def build_float64(checkpoint: ModelCheckpoint) -> nn.Module:
    """The trained model rebuilt in float64 throughout, in eval mode.

    `.double()` alone leaves constants that e3nn computes at build time (change-of-basis and Clebsch-Gordan
    tensors) in float32, which caps a measured invariance error near 1e-10; building under a float64
    default dtype measures the model's own error.
    """
    from perception.precision import default_dtype

    with default_dtype(torch.float64):
        model = build(checkpoint.family, **checkpoint.config)
    # Constant buffers (e3nn's Clebsch-Gordan and basis tensors) were saved in float32: keep the float64
    # ones built here where they agree to float32 precision; load every trained value.
    built = dict(model.named_buffers())
    trained = {
        key: value
        for key, value in checkpoint.state_dict.items()
        if not (
            key in built and built[key].is_floating_point() and torch.equal(built[key].to(value.dtype), value)
        )
    }
    model.load_state_dict(trained, strict=False)  # float32 values are copied into float64 tensors
    return model.eval()
