"""PointNet and DGCNN: shapes, invariance to point order, gradients and config errors."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from perception.models import dgcnn, pointnet
from perception.models.registry import ModelConfigError

FAMILIES = {
    "pointnet": (pointnet.PointNetConfig, pointnet.PointNet, pointnet.SIZES),
    "dgcnn": (dgcnn.DGCNNConfig, dgcnn.DGCNN, dgcnn.SIZES),
}


def _clouds(batch: int, num_points: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, num_points, 3, generator=generator) * 2 - 1


def _build(family: str, size: str = "tiny", **overrides: object) -> nn.Module:
    config_cls, model_cls, sizes = FAMILIES[family]
    torch.manual_seed(0)
    return model_cls(config_cls(**{**sizes[size], **overrides}))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_sizes_map_clouds_to_logits(family: str, size: str) -> None:
    # Small inputs even for the big sizes: the sizes differ in widths, not in what they accept.
    model = _build(family, size, num_classes=5).eval()
    with torch.no_grad():
        out = model(_clouds(2, 64))
    assert out.shape == (2, 5) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert model.config.num_classes == 5


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("train", [False, True])
def test_logits_are_invariant_to_point_order(family: str, train: bool) -> None:
    # In training mode too: BatchNorm statistics over a batch do not depend on the order of its points.
    model = _build(family, num_points=256) if family == "dgcnn" else _build(family)
    model.train(train)
    if train:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0  # dropout masks are drawn per position, not per point
    pos = _clouds(3, 300, seed=1)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, permuted = model(pos), model(pos[:, perm])
    torch.testing.assert_close(permuted, logits, rtol=1e-4, atol=1e-4)


def test_pointnet_input_transform_starts_as_identity() -> None:
    plain = _build("pointnet", input_transform=False).eval()
    with_tnet = _build("pointnet", input_transform=True).eval()
    with_tnet.features.load_state_dict(plain.features.state_dict())
    with_tnet.head.load_state_dict(plain.head.state_dict())
    pos = _clouds(2, 100)
    with torch.no_grad():
        torch.testing.assert_close(with_tnet(pos), plain(pos))


@pytest.mark.parametrize("input_transform", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pointnet_rows_match_the_papers_convolutions(
    input_transform: bool, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fast path (Linear over B * N rows) against the reference (1x1 convolutions over [B, C, N]): the
    # same logits, gradients and BatchNorm running statistics, in training and in evaluation.
    fast = _build("pointnet", input_transform=input_transform, dropout=0.0).to(dtype)
    reference = copy.deepcopy(fast)
    pos = _clouds(4, 150, seed=2).to(dtype)
    labels = torch.tensor([0, 3, 5, 7])
    outputs = {}
    for name, model, path in (("fast", fast, pointnet.per_point), ("ref", reference, pointnet.per_point_ref)):
        monkeypatch.setattr(pointnet, "per_point", path)
        model.train()
        logits = model(pos)
        nn.functional.cross_entropy(logits, labels).backward()
        with torch.no_grad():
            evaluated = model.eval()(pos)
        outputs[name] = (logits.detach(), evaluated, model)
    # float64 shows the same arithmetic; in float32 the gradients sum ~600 rows in another order
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    grad_tol = {"rtol": 1e-3, "atol": 1e-3} if dtype == torch.float32 else tol
    torch.testing.assert_close(outputs["fast"][0], outputs["ref"][0], **tol)
    torch.testing.assert_close(outputs["fast"][1], outputs["ref"][1], **tol)
    fast_state, ref_state = fast.state_dict(), reference.state_dict()
    for key in fast_state:  # running means, variances and counts
        torch.testing.assert_close(fast_state[key], ref_state[key], **tol)
    for (key, a), b in zip(fast.named_parameters(), reference.parameters(), strict=True):
        assert a.grad is not None, key
        torch.testing.assert_close(a.grad, b.grad, **grad_tol, msg=lambda m, key=key: f"{key}: {m}")


def test_a_pointnet_checkpoint_from_before_per_point_still_loads() -> None:
    # Before per_point, the shared MLPs were 1x1 convolutions: their weights [out, in, 1].
    model = _build("pointnet", input_transform=True).eval()
    old_state = {
        key: value.unsqueeze(-1) if "features" in key and value.dim() == 2 else value
        for key, value in model.state_dict().items()
    }
    assert sum(value.dim() == 3 for value in old_state.values()) == 7  # 4 layers, and the T-Net's 3
    loaded = _build("pointnet", input_transform=True)
    with torch.no_grad():
        for param in loaded.parameters():
            param.zero_()
    loaded.load_state_dict(old_state)
    pos = _clouds(2, 100)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(pos), model(pos), rtol=0, atol=0)


def test_models_are_not_rotation_invariant() -> None:
    # The study's premise: without 3D structure, a rotation changes the logits.
    rotation = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    pos = _clouds(2, 128, seed=2)
    for family in FAMILIES:
        model = _build(family, num_points=0) if family == "dgcnn" else _build(family)
        with torch.no_grad():
            model.eval()
            assert not torch.allclose(model(pos @ rotation.T), model(pos), atol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradients_reach_every_parameter(family: str) -> None:
    overrides = {"input_transform": True} if family == "pointnet" else {"num_points": 128}
    model = _build(family, **overrides)
    if family == "pointnet":
        # The T-Net's last layer starts at zero, which blocks gradients to the layers before it at step 0.
        nn.init.normal_(model.transform.regress[-1].weight, std=1e-2)
    model(_clouds(4, 160)).logsumexp(dim=1).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_dgcnn_rebuilds_the_graph_from_features() -> None:
    model = _build("dgcnn", num_points=0, depth=2)
    seen: list[torch.Tensor] = []
    model.blocks[1].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model(_clouds(2, 64))
    assert seen[0].shape == (2, 64, model.config.width)  # the second block's graph is over learned features


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32: the C neighbour max
@pytest.mark.parametrize("reference", ["forward_ref", "forward_per_edge"])
@pytest.mark.parametrize("train", [True, False])
def test_dense_edge_conv_matches_torch_geometric_edge_conv(train: bool, reference: str, dtype) -> None:
    # The dense block (linear per point, max of the neighbours' rows before the normalisation) against the
    # same weights through PyG's EdgeConv, and through the dense per-edge order (normalisation, activation,
    # then max): outputs, input gradients and, in training, BatchNorm's running statistics.
    torch.manual_seed(0)
    fast_block = dgcnn.DynamicEdgeBlock(5, 8, k=4).to(dtype).train(train)
    norm = fast_block.conv.nn[1]
    with torch.no_grad():  # negative scales too, so both the max and the min branch are exercised
        norm.weight.uniform_(-1, 1)
        norm.bias.uniform_(-1, 1)
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    ref_block = copy.deepcopy(fast_block)
    x = torch.randn(3, 20, 5, dtype=dtype, requires_grad=True)
    fast = fast_block(x)
    (grad_fast,) = torch.autograd.grad(fast.square().sum(), x)
    ref = getattr(ref_block, reference)(x)
    (grad_ref,) = torch.autograd.grad(ref.square().sum(), x)
    atol, grad_atol = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 1e-4)}[dtype]
    assert fast.shape == (3, 20, 8)
    assert torch.allclose(fast, ref, atol=atol) and torch.allclose(grad_fast, grad_ref, atol=grad_atol)
    for name, value in ref_block.conv.nn[1].named_buffers():
        assert torch.allclose(getattr(norm, name), value, atol=atol), name
    assert (norm.weight < 0).any() and (norm.weight > 0).any()


def test_edge_weights_start_as_torch_geometric_edge_conv_would_start_them() -> None:
    # Checkpoints and seeds from before EdgeWeights replaced EdgeConv as the block's parameters: same keys,
    # same initial weights for the same seed (EdgeConv's constructor redraws the linear layer's weights).
    from torch_geometric.nn import EdgeConv

    torch.manual_seed(3)
    ours = dgcnn.EdgeWeights(dgcnn._edge_mlp(6, 16))
    torch.manual_seed(3)
    theirs = EdgeConv(dgcnn._edge_mlp(6, 16), aggr="max")
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(theirs_state) and "nn.0.weight" in ours_state
    for name, value in theirs_state.items():
        assert torch.equal(ours_state[name], value), name
    torch.manual_seed(3)
    once = dgcnn._edge_mlp(6, 16)  # the draw without the second reset differs: the test can fail
    assert not torch.equal(once[0].weight, ours_state["nn.0.weight"])


def test_a_dgcnn_model_does_not_import_torch_geometric() -> None:
    # The fast path's workers skip the import (and the module file it generates per process).
    code = (
        "import sys, torch; from perception.models import build; "
        "build('dgcnn')(torch.randn(2, 64, 3)); print('torch_geometric' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_edge_statistics_equal_every_edges_mean_and_variance_far_from_zero() -> None:
    # Features far from zero: a sum of squares minus the squared mean would lose every digit in float32.
    torch.manual_seed(0)
    centre = 1e3 + torch.randn(3, 16, 4, dtype=torch.float64)
    neighbour = -2e3 + torch.randn(3 * 16, 4, dtype=torch.float64)
    sources = torch.randint(0, 16, (3, 16, 5)) + 16 * torch.arange(3)[:, None, None]  # repeats included
    edges = centre[:, :, None, :] + neighbour[sources]  # [3, 16, 5, 4]
    var, mean = torch.var_mean(edges.reshape(-1, 4), dim=0, unbiased=False)
    neighbour_sum = neighbour[sources].sum(dim=2).float()  # [3, 16, 4]
    got_mean, got_var = dgcnn._edge_statistics(centre.float(), neighbour.float(), neighbour_sum, sources)
    assert torch.allclose(got_mean.double(), mean, rtol=1e-6)
    assert torch.allclose(got_var.double(), var, rtol=1e-3)


CONFIG_ERRORS = [
    ("pointnet", "num_classes", 1),
    ("pointnet", "dim", 2),
    ("pointnet", "depth", 1),
    ("pointnet", "width", 0),
    ("pointnet", "dropout", 1.0),
    ("pointnet", "input_transform", "yes"),
    ("dgcnn", "num_classes", 0),
    ("dgcnn", "dim", 3),
    ("dgcnn", "depth", 0),
    ("dgcnn", "width", 0),
    ("dgcnn", "k", 0),
    ("dgcnn", "num_points", 5),
    ("dgcnn", "dropout", -0.1),
]


@pytest.mark.parametrize(("family", "key", "value"), CONFIG_ERRORS)
def test_bad_config_values_raise_one_line_errors(family: str, key: str, value: object) -> None:
    config_cls = FAMILIES[family][0]
    with pytest.raises(ModelConfigError, match=f"{config_cls.__name__}.{key} = ") as info:
        config_cls(**{key: value})
    assert "\n" not in str(info.value)
