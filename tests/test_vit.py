"""ViT: fused attention agrees with the explicit reference; the position variants (learned and resampled,
learned at fixed positions, sin-cos, axial RoPE, none) at any resolution, each against its definition."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import perception.layers.attention as attention
from perception.layers.attention import Attention, explicit_attention, set_fused_attention
from perception.layers.pos_embed import (
    extend_position_embedding,
    resample_position_embedding,
    sincos_position_embedding,
)
from perception.layers.rope import AxialRoPE, apply_rope, apply_rope_ref, axial_rope_angles
from perception.models.registry import ModelConfigError
from perception.models.vit import POS_EMBEDS, SIZES, ViT, ViTConfig


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


@pytest.mark.parametrize("pos_embed", ["learned", "rope"])
def test_model_with_fused_and_explicit_attention_agree_in_output_and_gradient(pos_embed):
    model = _vit(pos_embed=pos_embed)
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


@pytest.mark.parametrize("pos_embed", POS_EMBEDS)
def test_every_position_variant_runs_at_three_resolutions_with_gradients(pos_embed):
    model = _vit(pos_embed=pos_embed).train()
    for size in [(32, 32), (48, 64), (16, 24)]:  # the training grid 4 x 4, larger and smaller grids
        logits = model(torch.randn(2, 4, *size))
        assert logits.shape == (2, 8) and torch.isfinite(logits).all()
        model.zero_grad()
        logits.logsumexp(-1).mean().backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (
                size,
                name,
            )


@pytest.mark.parametrize("pos_embed", POS_EMBEDS)
def test_state_dict_deepcopy_and_pickle_round_trips(pos_embed):
    x = torch.randn(2, 4, 48, 40)
    model = _vit(pos_embed=pos_embed)
    torch.manual_seed(1)
    other = ViT(model.config).eval()
    other.load_state_dict(model.state_dict())
    buffer = io.BytesIO()
    torch.save(model, buffer)  # whole-module pickling, as mlflow.pytorch.log_model does
    buffer.seek(0)
    for twin in (other, copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        torch.testing.assert_close(twin(x), model(x))


def test_only_the_learned_variants_have_position_parameters():
    names = {pos: {n for n, _ in _vit(pos_embed=pos).named_parameters()} for pos in POS_EMBEDS}
    assert names["sincos"] == names["rope"] == names["none"]
    assert names["learned"] == names["learned_fixed"] == names["none"] | {"pos_embed"}


def test_learned_fixed_equals_learned_on_the_training_grid_and_shares_its_checkpoint():
    learned, fixed = _vit(pos_embed="learned"), _vit(pos_embed="learned_fixed")
    fixed.load_state_dict(learned.state_dict())  # a model trained as "learned" evaluates as "learned_fixed"
    x = torch.randn(2, 4, 32, 32)
    assert torch.equal(fixed(x), learned(x))
    assert not torch.allclose(fixed(torch.randn(2, 4, 48, 48)), learned(torch.randn(2, 4, 48, 48)))


def test_learned_fixed_keeps_trained_entries_at_their_positions_and_replicates_the_edge():
    model = _vit(pos_embed="learned_fixed")
    trained = model.pos_embed[0, 1:].view(4, 4, 64)  # (gh, gw, dim) of the 4 x 4 training grid
    bigger = model.position_embedding((6, 7))  # (1, 1 + 42, dim)
    assert torch.equal(bigger[0, 0], model.pos_embed[0, 0])  # class slot
    grid = bigger[0, 1:].view(6, 7, 64)
    assert torch.equal(grid[:4, :4], trained)  # own positions, no resampling
    assert torch.equal(grid[5, 6], trained[3, 3]) and torch.equal(grid[1, 5], trained[1, 3])  # nearest entry
    assert torch.equal(grid[4:, 2], trained[3, 2].expand(2, 64))
    smaller = model.position_embedding((2, 3))[0, 1:].view(2, 3, 64)
    assert torch.equal(smaller, trained[:2, :3])  # a smaller grid is the top-left crop
    assert model.position_embedding((4, 4)) is model.pos_embed
    wide = extend_position_embedding(torch.arange(7.0).view(1, 7, 1), (2, 3), (1, 5))  # prefix 0, grid 1..6
    assert wide.flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_sincos_table_continues_the_same_integer_positions_on_a_larger_grid():
    small, large = sincos_position_embedding((4, 4), 64), sincos_position_embedding((6, 9), 64)
    assert small.shape == (1, 17, 64) and large.shape == (1, 55, 64)
    assert torch.equal(small[0, 0], torch.zeros(64)) and torch.equal(large[0, 0], torch.zeros(64))
    assert torch.allclose(large[0, 1:].view(6, 9, 64)[:4, :4], small[0, 1:].view(4, 4, 64))
    grid = large[0, 1:].view(6, 9, 64)
    assert torch.allclose(grid[:, :, :32], grid[:, :1, :32].expand(6, 9, 32))  # first half: the row only
    assert torch.allclose(grid[:, :, 32:], grid[:1, :, 32:].expand(6, 9, 32))  # second half: the column
    assert torch.allclose(grid[2, 5, 32:48], torch.sin(5 * 10000 ** -(torch.arange(16) / 16)))  # MAE's form
    assert torch.allclose(grid[2, 5, :16].pow(2) + grid[2, 5, 16:32].pow(2), torch.ones(16))


@pytest.mark.parametrize("shift", [(0, 0), (3, -2), (17, 40)])
def test_rope_scores_depend_only_on_the_offset_between_positions(shift):
    """<R(p) q, R(p') k> = <q, R(p' - p) k>: shifting both positions by the same offset keeps the score."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 5, 16).unbind(0)  # 5 pairs of (q, k), head dim 16
    p = torch.tensor([[0, 0], [1, 2], [3, 1], [5, 7], [2, 2]])  # q's (row, col)
    p2 = torch.tensor([[0, 0], [0, 3], [3, 3], [1, 1], [7, 0]])  # k's (row, col)

    def scores(dp: torch.Tensor) -> torch.Tensor:
        a, b = axial_rope_angles(*(p + dp).T, 16), axial_rope_angles(*(p2 + dp).T, 16)  # (5, 8) each
        return (apply_rope(q, a.cos(), a.sin()) * apply_rope(k, b.cos(), b.sin())).sum(-1)  # (5,)

    base, shifted = scores(torch.zeros(2, dtype=torch.long)), scores(torch.tensor(shift))
    assert torch.allclose(shifted, base, atol=1e-5)
    assert torch.allclose(base[0], (q[0] * k[0]).sum())  # same position: plain dot product
    assert not torch.allclose(base[1:], (q[1:] * k[1:]).sum(-1), atol=1e-3)  # offsets change the score


def test_rope_rotates_rows_with_one_half_and_columns_with_the_other_and_not_the_class_token():
    cos, sin = AxialRoPE(16, num_prefix=1)((3, 4))  # each (1 + 12, 8)
    assert cos.shape == sin.shape == (13, 8)
    assert torch.equal(cos[0], torch.ones(8)) and torch.equal(sin[0], torch.zeros(8))  # class token
    angles = torch.atan2(sin[1:], cos[1:]).view(3, 4, 8)  # (gh, gw, pairs)
    assert torch.allclose(angles[:, :, :4], angles[:, :1, :4].expand(3, 4, 4))  # first half: row only
    assert torch.allclose(angles[:, :, 4:], angles[:1, :, 4:].expand(3, 4, 4))  # second half: column only
    assert torch.allclose(angles[2, 3, [0, 4]], torch.tensor([2.0, 3.0]))  # lowest frequency 1: the index
    x = torch.randn(2, 4, 13, 16)
    assert torch.allclose(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("layout", ["heads first", "as attention reads them"])
def test_rope_as_complex_products_matches_the_real_reference_on_strided_q_and_k(dtype, tol, layout):
    """The fast path reads q and k where they lie in one qkv tensor (B, T, 3, nh, hs): as strided
    (B, nh, T, hs) views, k at an offset, or both at once as attention rotates them, (B, T, 2, nh, hs)
    against (T, 1, 1, hs/2). The same rotated values and the same gradients as the reference."""
    torch.manual_seed(0)
    cos, sin = AxialRoPE(16, num_prefix=1)((5, 6))  # each (31, 8)
    qkv = torch.randn(2, 31, 3, 4, 16, dtype=dtype)  # (B, T, 3, nh, hs), as Attention's Linear gives it
    upstream = torch.randn(2, 31, 2, 4, 16, dtype=dtype)
    outs, grads = [], []
    for rotate in (apply_rope, apply_rope_ref):
        leaf = qkv.clone().requires_grad_(True)
        if layout == "heads first":
            q, k, _ = leaf.permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, T, hs) each, strided
            rotated = torch.stack([rotate(q, cos, sin), rotate(k, cos, sin)], 2).transpose(1, 3)
        else:
            rotated = rotate(leaf[:, :, :2], cos[:, None, None], sin[:, None, None])  # (B, T, 2, nh, hs)
        (rotated * upstream).sum().backward()
        outs.append(rotated.detach())
        grads.append(leaf.grad)
    assert outs[0].dtype == dtype and outs[0].shape == (2, 31, 2, 4, 16)
    assert torch.allclose(outs[0], outs[1], atol=tol, rtol=0)
    assert torch.allclose(grads[0], grads[1], atol=tol, rtol=0)
    assert not torch.allclose(outs[0], qkv[:, :, :2])  # it rotated something
    odd = torch.randn(1, 2 * 31 * 16 + 1, dtype=dtype)[:, 1:].view(2, 31, 16)  # odd offset: copied first
    assert torch.allclose(apply_rope(odd, cos, sin), apply_rope_ref(odd, cos, sin), atol=tol, rtol=0)


@pytest.mark.parametrize("pos_embed", ["rope", "sincos"])
def test_a_fixed_position_table_first_made_in_an_evaluation_can_be_trained_on(pos_embed, monkeypatch):
    """The tables are cached per grid: one first built under inference mode (an evaluation on a new
    canvas) must still take part in a training step on that canvas, and the cache gives the same table.
    The step rotates by the real reference, as bfloat16 does: its products save cos and sin for backward,
    which torch refuses for tensors made in inference mode."""
    torch.manual_seed(0)
    model = ViT(ViTConfig(num_classes=3, patch_size=4, image_size=32, pos_embed=pos_embed))
    x = torch.randn(2, 4, 44, 44)  # an 11 x 11 grid no other test uses
    with torch.inference_mode():
        model.eval()(x)
    monkeypatch.setattr(attention, "apply_rope", apply_rope_ref)
    model.train()(x).sum().backward()  # raises if a cached table were an inference tensor
    assert model.cls_token.grad is not None
    if pos_embed == "rope":
        assert model.rope((11, 11))[0] is model.rope((11, 11))[0]
        rows, cols = torch.meshgrid(torch.arange(11), torch.arange(11), indexing="ij")
        fresh = axial_rope_angles(rows.flatten(), cols.flatten(), 16)  # (121, 8)
        assert torch.allclose(model.rope((11, 11))[0][1:], fresh.cos())
    else:
        assert torch.equal(
            model.position_embedding((11, 11)), sincos_position_embedding((11, 11), 64, num_prefix=1)
        )


def test_rope_in_bfloat16_takes_the_reference():
    """torch has no complex bfloat16 (autocast's dtype): the real reference rotates it."""
    cos, sin = AxialRoPE(16, num_prefix=1)((2, 2))
    x = torch.randn(3, 5, 16).bfloat16()
    assert apply_rope(x, cos, sin).dtype == torch.bfloat16
    assert torch.equal(apply_rope(x, cos, sin), apply_rope_ref(x, cos, sin))


def shuffle_patches(x: torch.Tensor, perm: torch.Tensor, p: int = 8) -> torch.Tensor:
    """Move the image's p x p patches to other grid cells: patch perm[i] goes to cell i (row-major)."""
    B, C, H, W = x.shape
    gh, gw = H // p, W // p
    patches = x.view(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C, p, p)
    return patches[:, perm].view(B, gh, gw, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def test_without_position_the_model_sees_the_patches_as_a_set():
    """Moving patches to other grid cells leaves the class token's features unchanged with "none" (to
    round-off) and changes them with every other variant (by 0.2-1.4% at init, 1e4+ times round-off)."""
    x = torch.randn(2, 4, 32, 48)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    for pos_embed in POS_EMBEDS:
        model = _vit(pos_embed=pos_embed)
        before, after = (model.forward_features(v)[:, 0] for v in (x, shuffle_patches(x, perm)))  # (B, dim)
        change = ((after - before).norm() / before.norm()).item()
        assert change < 1e-6 if pos_embed == "none" else change > 1e-3, (pos_embed, change)


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"dim": 66}, "ViTConfig.dim = 66"),
        ({"image_size": 36}, "ViTConfig.image_size = 36"),
        ({"depth": 0}, "depth"),
        (
            {"pos_embed": "absolute"},
            "ViTConfig.pos_embed = 'absolute' is not allowed: expected one of learned, ",
        ),
        (
            {"pos_embed": "rope", "dim": 72},
            r"ViTConfig.pos_embed = 'rope' .* dim / heads divisible by 4 \(it is 18\)",
        ),
        (
            {"pos_embed": "sincos", "dim": 66, "heads": 3},
            r"ViTConfig.pos_embed = 'sincos' .* divisible by 4 \(dim = 66\)",
        ),
    ],
)
def test_bad_config_is_one_line_error(overrides, key):
    with pytest.raises(ModelConfigError, match=key):
        ViTConfig(**{**SIZES["tiny"], **overrides})
