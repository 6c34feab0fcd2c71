"""The Mamba-hybrid classifier: shapes at any resolution, gradients, config errors, scan backends."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from perception.models.mamba_hybrid import SIZES, MambaHybrid, MambaHybridConfig, MultiScanMamba
from perception.models.registry import ModelConfigError, ModelFamily
from perception.ops.scan import selective_scan_ref
from perception.ops.serialization import SCAN_ORDERS, scan_directions

# Small enough to run in milliseconds; attn_layers=1 puts one attention block after one Mamba block.
SMALL = {"dim": 32, "depth": 2, "attn_layers": 1, "heads": 2, "d_state": 8, "num_classes": 5}


def make(seed: int = 0, **overrides) -> MambaHybrid:
    torch.manual_seed(seed)
    return MambaHybrid(MambaHybridConfig(**{**SMALL, **overrides}))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("scan_order", SCAN_ORDERS)
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


@pytest.mark.parametrize("scan_order", ["hilbert", "random", "cross"])
@pytest.mark.parametrize("attn_layers", [0, 1])
def test_every_parameter_gets_a_finite_gradient(attn_layers, scan_order):
    model = make(attn_layers=attn_layers, scan_order=scan_order)
    model(torch.randn(3, 4, 32, 40)).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("scan_order", ["snake", "cross"])
def test_fast_scan_matches_reference_scan_in_the_model(scan_order):
    """The same weights run through selective_scan ("auto") and selective_scan_ref agree, with gradients."""
    x = torch.randn(2, 4, 48, 40)
    results = []
    for backend in ("auto", "ref"):
        model = make(seed=1, scan_backend=backend, scan_order=scan_order, attn_layers=0)
        out = model(x)
        out.square().sum().backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (out_fast, g_fast), (out_ref, g_ref) = results
    assert rel(out_fast, out_ref) < 1e-4
    for name in g_ref:
        assert rel(g_fast[name], g_ref[name]) < 1e-4, name


def mixer_reference(m: MultiScanMamba, x: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
    """The mixer by its definition: each direction on its own, reading the tokens in its own order with its
    slice of the parameters through the sequential scan, gated inside the scan as Vim does; the outputs
    put back at their grid positions and averaged. x (B, L, dim) row-major -> (B, L, dim)."""
    B, L, _ = x.shape
    k, d, n, r = m.num_directions, m.d_inner, m.d_state, m.dt_rank
    xs, z = m.in_proj(x).chunk(2, dim=-1)  # (B, L, d_inner) each
    total = torch.zeros_like(xs)  # (B, L, d_inner)
    for j in range(k):
        ch = slice(j * d, (j + 1) * d)  # direction j's channels
        u, zj = xs[:, paths[j]].transpose(1, 2), z[:, paths[j]].transpose(1, 2)  # (B, d_inner, L) in order j
        conv = F.conv1d(u, m.conv1d.weight[ch], m.conv1d.bias[ch], padding=m.conv1d.padding[0], groups=d)
        u = F.silu(conv[..., :L])  # causal: (B, d_inner, L)
        dt, Bj, Cj = torch.einsum("bdl,cd->bcl", u, m.x_proj[j]).split([r, n, n], dim=1)
        delta = torch.einsum("brl,dr->bdl", dt, m.dt_proj[j])  # (B, d_inner, L)
        A = -torch.exp(m.A_log[ch])
        y = selective_scan_ref(u, delta, A, Bj, Cj, m.D[ch], zj, m.dt_bias[ch], delta_softplus=True)
        total[:, paths[j]] += y.transpose(1, 2)  # (B, L, d_inner), back at the grid positions
    return m.out_proj(total / k)


def mixer(directions: int, seed: int = 0) -> MultiScanMamba:
    torch.manual_seed(seed)
    m = MultiScanMamba(16, d_state=4, d_conv=3, expand=2, scan_backend="ref", directions=directions).double()
    with torch.no_grad():
        for p in (m.dt_bias, m.D, m.conv1d.bias):  # break the init's symmetries: every channel different
            p.add_(torch.randn_like(p) * 0.1)
        m.A_log.add_(torch.rand_like(m.A_log))
    return m


@pytest.mark.parametrize("name", ["hilbert", "random", "cross"])
def test_grouped_scan_of_all_directions_matches_each_direction_on_its_own(name):
    m = mixer(4 if name == "cross" else 2)
    x = torch.randn(2, 15, 16, dtype=torch.float64)  # a 3 x 5 grid
    paths = scan_directions(name, 3, 5)
    torch.testing.assert_close(m(x, paths), mixer_reference(m, x, paths), rtol=1e-10, atol=1e-12)


def tie_directions(m: MultiScanMamba, copies: dict[int, int]) -> None:
    """Give direction `dst` the parameters of direction `src` for each dst: src in `copies`."""
    with torch.no_grad():
        for p in (m.conv1d.weight, m.conv1d.bias, m.x_proj, m.dt_proj, m.dt_bias, m.A_log, m.D):
            per_direction = p.view(m.num_directions, -1)  # (k, ...): direction j's slice in row j
            for dst, src in copies.items():
                per_direction[dst] = per_direction[src]


def transpose_tokens(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Row-major tokens (B, h*w, C) of an h x w grid -> those of the transposed w x h grid."""
    return x.view(x.shape[0], h, w, -1).transpose(1, 2).reshape(x.shape)  # (B, w*h, C)


def test_cross_scan_is_equivariant_to_transposing_the_grid_and_rowmajor_is_not():
    """Transposing the grid swaps cross-scan's row- and column-major directions; with their parameters
    tied, transposing the input transposes the output (to float64 round-off). A bidirectional row-major
    scan, its two directions tied the same way, is not equivariant: it reads a transposed grid by columns."""
    h, w = 3, 5
    x = torch.randn(2, h * w, 16, dtype=torch.float64)
    cross = mixer(4)
    tie_directions(cross, {1: 0, 3: 2})  # column-major as row-major, reversed column as reversed row
    out = cross(x, scan_directions("cross", h, w))
    out_t = cross(transpose_tokens(x, h, w), scan_directions("cross", w, h))
    assert (out_t - transpose_tokens(out, h, w)).abs().max() < 1e-12
    rowmajor = mixer(2)
    tie_directions(rowmajor, {1: 0})
    out = rowmajor(x, scan_directions("rowmajor", h, w))
    out_t = rowmajor(transpose_tokens(x, h, w), scan_directions("rowmajor", w, h))
    assert (out_t - transpose_tokens(out, h, w)).abs().max() > 1e-3


def test_mixer_refuses_paths_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"paths must be \[k=4, L=15\]"):
        mixer(4)(torch.randn(1, 15, 16, dtype=torch.float64), scan_directions("rowmajor", 3, 5))


@pytest.mark.parametrize("scan_order", ["rowmajor", "cross"])
def test_pure_mamba_has_no_2d_convolution_but_the_per_patch_embedding(scan_order):
    model = make(attn_layers=0, scan_order=scan_order)
    conv2d = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert conv2d == [model.patch_embed.proj]
    assert conv2d[0].kernel_size == conv2d[0].stride == (8, 8)  # one patch per output: no mixing across
    for m in model.modules():
        if isinstance(m, nn.Conv1d):  # Mamba's causal conv along each scan direction: depthwise, 1D
            assert m.groups == m.in_channels == m.out_channels


def test_old_bidirectional_checkpoints_load_into_every_two_direction_order():
    state = make(scan_order="rowmajor").state_dict()
    for order in ("snake", "hilbert", "random"):
        make(scan_order=order).load_state_dict(state)
    with pytest.raises(RuntimeError, match="size mismatch"):
        make(scan_order="cross").load_state_dict(state)


def test_scan_order_changes_the_function():
    """Same weights, different serialisation: a different model (position reaches it only via order)."""
    x = torch.randn(2, 4, 32, 32)
    rowmajor, hilbert = make(scan_order="rowmajor").eval(), make(scan_order="hilbert").eval()
    hilbert.load_state_dict(rowmajor.state_dict())
    assert not torch.allclose(rowmajor(x), hilbert(x), atol=1e-5)


@pytest.mark.parametrize("scan_order", ["hilbert", "random", "cross"])
def test_state_dict_round_trip_and_deepcopy(scan_order):
    x = torch.randn(2, 4, 32, 32)
    model = make(seed=2, scan_order=scan_order).eval()
    other = make(seed=3, scan_order=scan_order).eval()
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


def test_a_grid_first_seen_in_inference_mode_still_trains():
    """The scan paths are cached per grid and device: a cache filled under inference_mode must not hand
    an inference tensor to a later training step."""
    model = make(scan_order="snake", attn_layers=0)
    x = torch.randn(1, 4, 40, 72)  # a 5x9 grid no other test uses
    with torch.inference_mode():
        model(x)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
