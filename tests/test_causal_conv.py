"""Mamba's causal depthwise convolution and SiLU: the C kernel against the nn.Conv1d reference."""

from __future__ import annotations

import pytest
import torch

import perception.ops.causal_conv as causal_conv
from perception.models.mamba_hybrid import MambaHybrid, MambaHybridConfig
from perception.ops.causal_conv import causal_conv1d_silu, causal_conv1d_silu_ref, fused_available
from tests.conftest import on_one_then_two_threads

pytestmark = pytest.mark.skipif(not fused_available(), reason="causal conv kernel: no C compiler here")


def _run(function, x: torch.Tensor, conv: torch.nn.Conv1d, with_bias: bool = True):
    """Output and the gradients of x, the taps and the bias under a random upstream gradient."""
    leaves = [x.detach().clone().requires_grad_(), conv.weight.detach().clone().requires_grad_()]
    bias = conv.bias.detach().clone().requires_grad_() if with_bias else None
    out = function(leaves[0], leaves[1], bias)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    wrt = [*leaves, *([bias] if bias is not None else [])]
    return (out.detach(), *torch.autograd.grad(out, wrt, upstream))


@pytest.mark.parametrize(
    ("batch", "channels", "length", "taps"),
    [(1, 1, 1, 4), (2, 3, 2, 4), (3, 5, 17, 4), (32, 64, 64, 4), (2, 8, 40, 2), (2, 8, 40, 7)],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_kernel_equals_the_conv1d_reference(batch, channels, length, taps, with_bias) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(channels, channels, taps, groups=channels, padding=taps - 1, bias=with_bias)
    x = torch.randn(batch, channels, length)
    fast = _run(causal_conv1d_silu, x, conv, with_bias)
    ref = _run(causal_conv1d_silu_ref, x, conv, with_bias)
    for got, want in zip(fast, ref, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_the_output_is_causal_each_token_sees_only_itself_and_earlier_ones() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(4, 4, 4, groups=4, padding=3)
    x = torch.randn(2, 4, 12)
    changed = x.clone()
    changed[..., 7:] += 1.0  # tokens from 7 on
    before, after = (
        causal_conv1d_silu(x, conv.weight, conv.bias),
        causal_conv1d_silu(changed, conv.weight, conv.bias),
    )
    assert torch.equal(before[..., :7], after[..., :7])
    assert not torch.equal(before[..., 7:], after[..., 7:])


def test_the_kernel_runs_float32_cpu_and_the_reference_everything_else(monkeypatch) -> None:
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3)
    x = torch.randn(2, 6, 9)
    calls = []
    original = causal_conv._CausalConvSiLU.apply
    monkeypatch.setattr(causal_conv._CausalConvSiLU, "apply", lambda *a: calls.append(1) or original(*a))
    causal_conv1d_silu(x, conv.weight, conv.bias)
    assert calls == [1]
    doubled = conv.double()
    out = causal_conv1d_silu(x.double(), doubled.weight, doubled.bias)
    assert calls == [1] and out.dtype == torch.float64
    assert torch.equal(out, causal_conv1d_silu_ref(x.double(), doubled.weight, doubled.bias))


def test_two_threads_give_exactly_what_one_gives() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(16, 16, 4, groups=16, padding=3)
    x = torch.randn(8, 16, 33)
    one, two = on_one_then_two_threads(lambda: _run(causal_conv1d_silu, x, conv))
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


def test_mamba_trains_the_same_with_the_kernel_as_with_conv1d(monkeypatch) -> None:
    """A Mamba block's loss and every gradient, through the kernel and through nn.Conv1d, agree; the
    checkpoint keeps nn.Conv1d's weight and bias."""
    config = MambaHybridConfig(num_classes=3, in_channels=2, patch_size=2, dim=16, depth=2, attn_layers=0)
    torch.manual_seed(0)
    model = MambaHybrid(config)
    x, y = torch.randn(4, 2, 8, 8), torch.tensor([0, 1, 2, 0])

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    fast = gradients()
    monkeypatch.setattr("perception.models.mamba_hybrid.causal_conv1d_silu", causal_conv1d_silu_ref)
    ref = gradients()
    assert fast.keys() == ref.keys() and "blocks.0.mixer.conv1d.weight" in fast
    for name in fast:
        torch.testing.assert_close(fast[name], ref[name], atol=1e-5, rtol=1e-4, msg=name)
