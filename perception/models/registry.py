"""The model registry: a family is a frozen config dataclass, a module class and named sizes.

`build(name, size="tiny", **hparams)` resolves a config from the named size overridden by `hparams` and
builds the module. Unknown names or hparams fail with one line naming what is allowed.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn


class ModelConfigError(ValueError):
    """A bad model name, size or hyperparameter; the message names it and what is allowed."""


@dataclass(frozen=True)
class ModelFamily:
    config_cls: type[Any]  # a frozen dataclass; its __post_init__ rejects bad values with ModelConfigError
    model_cls: type[nn.Module]  # built as model_cls(config)
    sizes: dict[str, dict[str, Any]]  # named sizes: "tiny" (the CPU default), "small", "base"
    input_kind: Literal["image", "points"]  # image: float32[B, C, H, W]; points: float32[B, N, 3]

    def config(self, size: str = "tiny", **hparams: Any) -> Any:
        if size not in self.sizes:
            raise ModelConfigError(f"size {size!r} is not allowed: expected one of {', '.join(self.sizes)}")
        known = {f.name for f in dataclasses.fields(self.config_cls)}
        for key in hparams:
            if key not in known:
                raise ModelConfigError(
                    f"{self.config_cls.__name__}.{key}: unknown hparam; allowed: {', '.join(sorted(known))}"
                )
        return self.config_cls(**{**self.sizes[size], **hparams})


def check(condition: bool, config: Any, key: str, allowed: str) -> None:
    """For configs' __post_init__: raise a one-line ModelConfigError unless `condition`."""
    if not condition:
        value = getattr(config, key)
        raise ModelConfigError(
            f"{type(config).__name__}.{key} = {value!r} is not allowed: expected {allowed}"
        )


def without_parametrizations(model: nn.Module) -> nn.Module:
    """A copy of `model` with every `torch.nn.utils.parametrize` parametrisation baked into plain weights.

    Parametrised modules pickle only through `state_dict`; the copy pickles whole (e.g. for MLflow) and
    computes the same function.
    """
    import copy

    from torch.nn.utils import parametrize

    plain = copy.deepcopy(model)
    for module in plain.modules():
        if parametrize.is_parametrized(module):
            parametrizations = typing.cast(nn.ModuleDict, module.parametrizations)
            for name in list(parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return plain
