"""Model families of the study, by name. Adding a family: one file in this folder, one entry in FAMILIES."""

from __future__ import annotations

from typing import Any

from torch import nn

from perception.models import dgcnn, equivariant, mamba_hybrid, pointnet, vit
from perception.models.registry import ModelConfigError, ModelFamily

# name -> family. The study trains and evaluates every family listed here, by its input kind.
FAMILIES: dict[str, ModelFamily] = {
    "vit": ModelFamily(vit.ViTConfig, vit.ViT, vit.SIZES, "image"),
    "mamba_hybrid": ModelFamily(
        mamba_hybrid.MambaHybridConfig, mamba_hybrid.MambaHybrid, mamba_hybrid.SIZES, "image"
    ),
    "e3nn": ModelFamily(equivariant.E3nnConfig, equivariant.E3nnNet, equivariant.SIZES, "points"),
    "pointnet": ModelFamily(pointnet.PointNetConfig, pointnet.PointNet, pointnet.SIZES, "points"),
    "dgcnn": ModelFamily(dgcnn.DGCNNConfig, dgcnn.DGCNN, dgcnn.SIZES, "points"),
}


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ModelConfigError(f"model {name!r} is not registered; allowed: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def build(name: str, size: str = "tiny", **hparams: Any) -> nn.Module:
    """Build family `name` at a named size, with any hparam of its config overridden."""
    family = get_family(name)
    return family.model_cls(family.config(size, **hparams))


__all__ = ["FAMILIES", "ModelConfigError", "ModelFamily", "build", "get_family"]
