"""ViT: fused attention agrees with the explicit reference; the position grid resamples across resolutions."""

from __future__ import annotations

import pytest
import torch

from perception.layers.attention import Attention, explicit_attention, set_fused_attention
from perception.layers.pos_embed import resample_position_embedding
from perception.models.registry import ModelConfigError
from perception.models.vit import SIZES, ViT, ViTConfig


def _vit(**overrides) -> ViT:
    torch.manual_seed(0)
    return ViT(ViTConfig(**{**SIZES["tiny"], **overrides})).eval()


@pytest.mark.parametrize("tokens", [17, 65, 197])
def test_fused_attention_matches_explicit_reference(tokens):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, tokens, 16).unbind(0)
    fused = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(fused, explicit_attention(q, k, v), atol=1e-5)
    attention = Attention(64, 4)
    x = torch.randn(2, tokens, 64)
    fast = attention(x)
    attention.fused = False
    assert torch.allclose(fast, attention(x), atol=1e-5)


def test_model_with_fused_and_explicit_attention_agree_in_output_and_gradient():
    model = _vit()
    x = torch.randn(2, 4, 48, 48)
    fused = model(x)
    fused.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    set_fused_attention(model, False)
    explicit = model(x)
    explicit.sum().backward()
    assert torch.allclose(fused, explicit, atol=1e-5)
    for g, p in zip(grads, model.parameters(), strict=True):
        assert torch.allclose(g, p.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("size", [(32, 32), (48, 48), (64, 64), (32, 64), (8, 8)])
def test_runs_at_any_resolution_the_patch_divides(size):
    assert _vit()(torch.randn(2, 4, *size)).shape == (2, 8)


def test_resolution_not_divisible_by_patch_is_refused():
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        _vit()(torch.randn(1, 4, 36, 36))


def test_resampling_keeps_class_slot_and_is_identity_on_the_training_grid():
    model = _vit()
    pos = model.pos_embed
    assert model.position_embedding((4, 4)) is pos
    bigger = model.position_embedding((8, 6))
    assert bigger.shape == (1, 1 + 48, 64)
    assert torch.equal(bigger[:, 0], pos[:, 0])


def test_bicubic_resampling_preserves_smooth_fields():
    # A linear ramp over the grid stays a ramp (up to the border) when the grid is resized.
    gh = gw = 8
    ys, xs = torch.meshgrid(
        torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32), indexing="ij"
    )
    field = torch.stack([torch.ones_like(xs), xs / (gw - 1)], dim=-1).reshape(1, gh * gw, 2)
    pos = torch.cat([torch.full((1, 1, 2), 7.0), field], dim=1)
    out = resample_position_embedding(pos, (gh, gw), (16, 16))
    grid = out[0, 1:].reshape(16, 16, 2)
    assert torch.allclose(grid[..., 0], torch.ones(16, 16), atol=1e-5)  # constants stay constant
    assert (grid[:, 1:, 1] - grid[:, :-1, 1] >= -1e-6).all()  # monotone along x
    assert torch.equal(out[0, 0], torch.tensor([7.0, 7.0]))


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"dim": 66}, "ViTConfig.dim = 66"),
        ({"image_size": 36}, "ViTConfig.image_size = 36"),
        ({"depth": 0}, "depth"),
    ],
)
def test_bad_config_is_one_line_error(overrides, key):
    with pytest.raises(ModelConfigError, match=key):
        ViTConfig(**{**SIZES["tiny"], **overrides})
