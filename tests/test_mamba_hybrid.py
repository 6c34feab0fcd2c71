"""The Mamba-hybrid classifier: shapes at any resolution, gradients, config errors, scan backends."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from perception.models.mamba_hybrid import SIZES, MambaHybrid, MambaHybridConfig
from perception.models.registry import ModelConfigError, ModelFamily

# Small enough to run in milliseconds; attn_layers=1 puts one attention block after one Mamba block.
SMALL = {"dim": 32, "depth": 2, "attn_layers": 1, "heads": 2, "d_state": 8, "num_classes": 5}


def make(seed: int = 0, **overrides) -> MambaHybrid:
    torch.manual_seed(seed)
    return MambaHybrid(MambaHybridConfig(**{**SMALL, **overrides}))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("scan_order", ["rowmajor", "snake", "hilbert"])
@pytest.mark.parametrize("attn_layers", [0, 1])
def test_shapes_at_any_resolution(scan_order, attn_layers):
    model = make(scan_order=scan_order, attn_layers=attn_layers).eval()
    for h, w in [(32, 32), (48, 48), (64, 64), (24, 56)]:  # patch 8: grids 4x4, 6x6, 8x8, 3x7
        x = torch.randn(2, 4, h, w)
        assert model.forward_features(x).shape == (2, (h // 8) * (w // 8), 32)
        logits = model(x)
        assert logits.shape == (2, 5) and torch.isfinite(logits).all()


def test_image_size_not_divisible_by_patch_fails():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        make()(torch.randn(1, 4, 30, 32))


@pytest.mark.parametrize("attn_layers", [0, 1])
def test_every_parameter_gets_a_finite_gradient(attn_layers):
    model = make(attn_layers=attn_layers, scan_order="hilbert")
    model(torch.randn(3, 4, 32, 40)).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_fast_scan_matches_reference_scan_in_the_model():
    """The same weights run through selective_scan ("auto") and selective_scan_ref agree, with gradients."""
    x = torch.randn(2, 4, 48, 40)
    results = []
    for backend in ("auto", "ref"):
        model = make(seed=1, scan_backend=backend, scan_order="snake", attn_layers=0)
        out = model(x)
        out.square().sum().backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (out_fast, g_fast), (out_ref, g_ref) = results
    assert rel(out_fast, out_ref) < 1e-4
    for name in g_ref:
        assert rel(g_fast[name], g_ref[name]) < 1e-4, name


def test_scan_order_changes_the_function():
    """Same weights, different serialisation: a different model (position reaches it only via order)."""
    x = torch.randn(2, 4, 32, 32)
    rowmajor, hilbert = make(scan_order="rowmajor").eval(), make(scan_order="hilbert").eval()
    hilbert.load_state_dict(rowmajor.state_dict())
    assert not torch.allclose(rowmajor(x), hilbert(x), atol=1e-5)


def test_state_dict_round_trip_and_deepcopy():
    x = torch.randn(2, 4, 32, 32)
    model = make(seed=2, scan_order="hilbert").eval()
    other = make(seed=3, scan_order="hilbert").eval()
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other(x), model(x))
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(x), model(x))
    assert clone.config == model.config


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("attn_layers", 5),
        ("attn_layers", -1),
        ("depth", 0),
        ("heads", 3),  # does not divide dim = 32
        ("scan_order", "zigzag"),
        ("scan_backend", "cuda"),
        ("d_state", 0),
        ("d_conv", 1.5),
        ("expand", True),
        ("patch_size", 0),
        ("num_classes", 0),
        ("in_channels", "4"),
        ("mlp_ratio", 0.0),
    ],
)
def test_config_errors_are_one_line_and_name_the_key(key, value):
    with pytest.raises(ModelConfigError) as err:
        MambaHybridConfig(**{**SMALL, key: value})
    message = str(err.value)
    assert "\n" not in message and f"MambaHybridConfig.{key} = {value!r}" in message


def test_sizes_are_valid_and_registerable():
    family = ModelFamily(MambaHybridConfig, MambaHybrid, SIZES, "image")
    assert set(SIZES) == {"tiny", "small", "base"}
    for size in SIZES:
        config = family.config(size)
        assert config.attn_layers < config.depth  # every size is a hybrid with Mamba first
    tiny = MambaHybrid(family.config("tiny", scan_order="snake"))
    assert tiny(torch.randn(2, 4, 32, 32)).shape == (2, 8)
    assert dataclasses.is_dataclass(tiny.config) and tiny.config.scan_order == "snake"


def test_blocks_are_mamba_first_then_attention():
    from perception.layers.attention import TransformerBlock
    from perception.models.mamba_hybrid import MambaBlock

    model = make(depth=4, attn_layers=2)
    kinds = [type(b) for b in model.blocks]
    assert kinds == [MambaBlock, MambaBlock, TransformerBlock, TransformerBlock]
    assert all(type(b) is MambaBlock for b in make(depth=3, attn_layers=0).blocks)
