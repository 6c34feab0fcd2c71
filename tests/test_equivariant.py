"""The e3nn point network: equivariant layers, invariant logits (untrained and trained), config and state."""

from __future__ import annotations

import copy

import pytest
import torch
from e3nn import o3
from e3nn.util.test import assert_equivariant

from perception.evaluation.rotation import invariance_error
from perception.models import build
from perception.models.equivariant import (
    SIZES,
    E3nnConfig,
    E3nnNet,
    GatedConvolution,
    PointConvolution,
)
from perception.models.registry import ModelConfigError
from perception.precision import default_dtype

# Relative to the logits' magnitude: `invariance_error` divides each cloud's change by its logits' norm.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def _clouds(batch: int, num_points: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Points on anisotropic ellipsoid surfaces plus noise, inside the unit ball like the study's data."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(batch, num_points, 3, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    scales = 0.3 + 0.7 * torch.rand(batch, 1, 3, generator=generator, dtype=torch.float64)
    noise = 0.02 * torch.randn(batch, num_points, 3, generator=generator, dtype=torch.float64)
    return (directions * scales + noise).to(dtype)


def _model(dtype: torch.dtype, seed: int = 0, **overrides: object) -> E3nnNet:
    torch.manual_seed(seed)
    # e3nn computes its Clebsch-Gordan constants at construction in the default dtype: build in `dtype`.
    with default_dtype(dtype):
        return E3nnNet(E3nnConfig(**{**SIZES["tiny"], **overrides}))


def _train_a_little(model: E3nnNet, dtype: torch.dtype, steps: int = 5) -> None:
    pos = _clouds(8, 160, dtype, seed=9)
    labels = torch.arange(8) % model.config.num_classes
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(pos), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("bipartite", [False, True, "own target irreps"])
@pytest.mark.parametrize("layer_cls", [PointConvolution, GatedConvolution])
def test_convolution_layers_are_equivariant(layer_cls: type, bipartite: bool | str) -> None:
    torch.manual_seed(0)
    irreps_in, irreps_sh = o3.Irreps("4x0e + 2x1o + 2x2e"), o3.Irreps.spherical_harmonics(2)
    irreps_dst = o3.Irreps("3x0e + 1x1o + 1x2e") if bipartite == "own target irreps" else irreps_in
    with default_dtype(torch.float64):
        layer = layer_cls(
            irreps_in,
            irreps_sh,
            "6x0e + 3x1o + 2x2e",
            num_basis=5,
            radial_hidden=8,
            num_neighbors=3,
            irreps_dst=irreps_dst,
        )
    num_sources, num_targets, num_edges = 10, (6 if bipartite else 10), 30
    args = [
        irreps_in.randn(num_sources, -1, dtype=torch.float64),
        torch.randint(0, num_sources, (num_edges,)),
        torch.randint(0, num_targets, (num_edges,)),
        o3.spherical_harmonics(irreps_sh, torch.randn(num_edges, 3, dtype=torch.float64), normalize=True),
        torch.rand(num_edges, 5, dtype=torch.float64),
    ]
    irreps = [irreps_in, None, None, irreps_sh, "5x0e"]
    if bipartite:  # targets have their own features, for the self-connection
        args.append(irreps_dst.randn(num_targets, -1, dtype=torch.float64))
        irreps.append(irreps_dst)
    assert layer.irreps_in == irreps_in and layer.irreps_dst == irreps_dst
    assert layer(*args).shape == (num_targets, layer.irreps_out.dim)
    with default_dtype(torch.float64):  # e3nn builds the Wigner D matrices in the default dtype
        errors = assert_equivariant(
            layer, args_in=args, irreps_in=irreps, irreps_out=[layer.irreps_out], tolerance=1e-10
        )
    assert max(float(e.max()) for e in errors.values()) < 1e-10


def test_model_passes_e3nn_assert_equivariant() -> None:
    # Rotations, reflections and translations of the cloud leave the logits (scalars, 0e) unchanged.
    model = _model(torch.float64)
    pos = _clouds(2, 200, torch.float64)
    assert_equivariant(
        model, args_in=[pos], irreps_in=["cartesian_points"], irreps_out=[f"{model.config.num_classes}x0e"]
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logits_are_rotation_invariant_untrained_and_trained(dtype: torch.dtype) -> None:
    model = _model(dtype)
    pos = _clouds(4, 256, dtype, seed=1)
    assert invariance_error(model, pos, rotations=3, dtype=dtype) < TOLERANCE[dtype]
    _train_a_little(model, dtype)
    assert invariance_error(model, pos, rotations=3, dtype=dtype) < TOLERANCE[dtype]


@pytest.mark.parametrize("local_shape", [False, True])
@pytest.mark.parametrize("global_invariants", [False, True])
@pytest.mark.parametrize("global_frame", [False, True])
def test_float64_invariance_with_and_without_the_invariant_inputs(
    local_shape: bool, global_invariants: bool, global_frame: bool
) -> None:
    model = _model(
        torch.float64, local_shape=local_shape, global_invariants=global_invariants, global_frame=global_frame
    )
    pos = _clouds(3, 256, torch.float64, seed=7)
    assert invariance_error(model, pos, rotations=3) < TOLERANCE[torch.float64]
    head_in = model.head[0].in_features
    assert head_in == 2 * model.config.dim + (3 + 2 * model.config.num_basis) * global_invariants


def test_local_shape_tells_flat_from_round_neighbourhoods() -> None:
    model = _model(torch.float64)
    flat = _clouds(1, 256, torch.float64, seed=8) * torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    round_ = _clouds(1, 256, torch.float64, seed=8)
    for cloud, flat_expected in ((flat, True), (round_, False)):
        graph = model.preprocess(cloud)
        invariants, quadric, shape = model._local_shape(graph.points.reshape(-1, 3), graph.down, batch=1)
        eigen = invariants[:, :3]
        torch.testing.assert_close(eigen.sum(dim=1), torch.ones(len(eigen), dtype=torch.float64))
        assert (eigen[:, 0] < 1e-12).all() == flat_expected  # no spread out of the plane
        torch.testing.assert_close(invariants[:, 3].mean(), torch.tensor(1.0, dtype=torch.float64))
        torch.testing.assert_close(torch.linalg.eigvalsh(shape), eigen)
        assert quadric.shape == (len(eigen), 5)
        # The quadric is the traceless part of the same matrix: zero exactly where the neighbourhood is round.
        traceless = shape - torch.eye(3, dtype=torch.float64) / 3
        torch.testing.assert_close(
            quadric.norm(dim=1) / traceless.flatten(1).norm(dim=1),
            torch.full((len(eigen),), float(quadric[0].norm() / traceless[0].norm()), dtype=torch.float64),
        )


def test_frame_invariants_follow_the_principal_axes() -> None:
    # A cloud stretched along x: a centre on the x axis scores higher than one at the same radius on y.
    points = _clouds(1, 256, torch.float64, seed=9) * torch.tensor([1.0, 0.3, 0.3], dtype=torch.float64)
    points = points - points.mean(dim=1, keepdim=True)
    centres = torch.tensor([[[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]], dtype=torch.float64)
    along_x, along_y = E3nnNet._frame_invariants(points, centres, None)
    assert along_x[0] > 2 * along_y[0] and along_x[1] > 2 * along_y[1]
    assert along_x[2] == 0 and along_y[2] == 0  # no local shape given


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logits_are_invariant_to_translation_and_point_order(dtype: torch.dtype) -> None:
    model = _model(dtype)
    pos = _clouds(3, 256, dtype, seed=2)
    with torch.no_grad():
        logits = model(pos)
        scale = logits.abs().max()
        shifted = model(pos + torch.tensor([0.7, -0.4, 0.25], dtype=dtype))
        perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
        permuted = model(pos[:, perm])
    assert (shifted - logits).abs().max() / scale < TOLERANCE[dtype]
    assert (permuted - logits).abs().max() / scale < TOLERANCE[dtype]


def test_each_cloud_is_classified_on_its_own() -> None:
    model = _model(torch.float64)
    pos = _clouds(3, 200, torch.float64, seed=3)
    with torch.no_grad():
        together = model(pos)
        alone = torch.cat([model(pos[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-10, atol=1e-10)


def test_preprocess_builds_the_graphs_apart_from_message_passing() -> None:
    model = _model(torch.float64)
    cfg = model.config
    pos = _clouds(2, 300, torch.float64, seed=5) + 3.0
    graph = model.preprocess(pos)
    assert graph.points.shape == (2, 300, 3) and graph.centres.shape == (2, cfg.num_points, 3)
    torch.testing.assert_close(graph.points.mean(dim=1), torch.zeros(2, 3, dtype=torch.float64))
    assert graph.down.shape == (2, 2 * cfg.num_points * cfg.k_input)
    assert graph.edges.shape == (2, 2 * cfg.num_points * cfg.k)
    # Centres are input points; every centre's nearest input point is itself.
    points, centres = graph.points.reshape(-1, 3), graph.centres.reshape(-1, 3)
    first = graph.down[0].reshape(-1, cfg.k_input)[:, 0]
    torch.testing.assert_close(points[first], centres, rtol=0, atol=0)


def test_weight_gain_changes_the_steps_not_the_function() -> None:
    pos = _clouds(2, 200, torch.float32, seed=6)
    plain, gained = _model(torch.float32, weight_gain=1.0), _model(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(gained(pos), plain(pos))
    stored = dict(gained.named_parameters())["layers.0.conv.sc.parametrizations.weight.original"]
    torch.testing.assert_close(stored * gained.config.weight_gain, gained.layers[0].conv.sc.weight)
    assert not any("parametrizations" in name for name, _ in gained.head.named_parameters())


@pytest.mark.parametrize("size", list(SIZES))
def test_sizes_build_and_map_clouds_to_logits(size: str) -> None:
    model = E3nnNet(E3nnConfig(**SIZES[size], num_classes=5))
    assert model.irreps_out == o3.Irreps(f"{model.config.dim}x0e")
    if size == "tiny":
        # Fewer points than num_points: all are kept; float32 in, float32 logits out.
        out = model(_clouds(2, 50, torch.float32))
        assert out.shape == (2, 5) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_gradients_reach_every_parameter() -> None:
    model = _model(torch.float32)
    model(_clouds(2, 200, torch.float32)).square().sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_deepcopy_and_state_dict_round_trip() -> None:
    model = _model(torch.float32)
    _train_a_little(model, torch.float32, steps=2)
    pos = _clouds(2, 200, torch.float32, seed=4)
    with torch.no_grad():
        expected = model(pos)
        torch.testing.assert_close(copy.deepcopy(model)(pos), expected, rtol=0, atol=0)
        fresh = _model(torch.float32, seed=1)
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(fresh(pos), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_classes", 1),
        ("dim", 0),
        ("mul", 0),
        ("depth", 0),
        ("lmax", 0),
        ("lmax", 5),
        ("k", 0),
        ("k_input", 0),
        ("weight_gain", 0.0),
        ("num_points", 8),
        ("num_basis", 1),
        ("radial_hidden", 0),
        ("max_radius", 0.0),
        ("dim", 2.5),
        ("local_shape", "yes"),
        ("global_invariants", 1),
        ("global_frame", None),
    ],
)
def test_bad_config_values_raise_one_line_errors(key: str, value: object) -> None:
    with pytest.raises(ModelConfigError, match=f"E3nnConfig.{key} = ") as info:
        E3nnConfig(**{key: value})
    assert "\n" not in str(info.value)


def test_bf16_autocast_leaves_the_model_in_float32():
    """Its invariants need float32: under autocast it computes exactly what it computes without."""
    torch.manual_seed(0)
    model = build("e3nn", num_classes=3).eval()
    clouds = torch.randn(2, 64, 3)
    with torch.no_grad():
        plain = model(clouds)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            mixed = model(clouds)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)
